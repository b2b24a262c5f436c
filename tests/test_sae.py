"""SAE and transcoder latents as the units (subject=sae): hook names, both file formats, a latent
planted on a token set and recovered through the whole pipeline, and the errors, all on the tiny
models built from configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neuronlens import pipeline
from neuronlens.models import SubjectError
from neuronlens.subject.hooks import hook_point, lens_point, module_point, neuron_hooks
from neuronlens.subject.sae import SAESubject, load_coder, load_coders
from test_pipeline import config, rows

D, LATENTS = 32, 24   # the tiny models' hidden size; latents of the test SAEs


def sae_lens_files(path: Path, hook: str, W_enc, b_enc, W_dec, b_dec, architecture="standard",
                   threshold=None, **cfg) -> Path:
    """An SAE saved as sae_lens 6 saves one (cfg.json + sae_weights.safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if threshold is not None:
        weights["threshold"] = threshold
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "sae_weights.safetensors")
    (path / "cfg.json").write_text(json.dumps({
        "architecture": architecture, "d_in": W_enc.shape[0], "d_sae": W_enc.shape[1],
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": "transcoder" not in architecture,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"hook_name": hook, "model_name": "tiny"}, **cfg}))
    return path


def sparsify_files(path: Path, W_enc, b_enc, W_dec, b_dec, k: int, transcode=False) -> Path:
    """A sparse coder saved as EleutherAI's sparsify saves one (folder named for its hookpoint)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec.contiguous(),
               "b_dec": b_dec}, path / "sae.safetensors")
    (path / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
        "num_latents": W_enc.shape[1], "k": k, "multi_topk": False, "skip_connection": False,
        "transcode": transcode, "d_in": W_enc.shape[0]}))
    return path


def random_weights(seed: int, d_in=D, d_out=D, latents=LATENTS):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_in, latents, generator=g), torch.randn(latents, generator=g) * 0.1,
            torch.randn(latents, d_out, generator=g), torch.randn(d_out, generator=g))


def read(model, points: dict, ids: torch.Tensor) -> dict:
    got = {}
    with torch.no_grad(), neuron_hooks(model, list(points), lambda l, a: got.setdefault(l, a.clone()), points):
        model(input_ids=ids)
    return got[next(iter(points))]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformer_lens_hook_names_read_what_they_name(request, arch):
    """Each TransformerLens name against the HF model's own computation: the residual stream
    before and after layer 1 are its hidden states; the MLP's output is what it adds to the
    residual between the blocks; its input is the second norm of that residual."""
    model = request.getfixturevalue(f"tiny_{arch}")
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    at = lambda name: read(model, {1: lens_point(model, f"blocks.1.{name}")}, ids)
    torch.testing.assert_close(at("hook_resid_pre"), hidden[1])
    torch.testing.assert_close(at("hook_resid_post"), hidden[2])
    mid = at("hook_resid_mid")
    torch.testing.assert_close(at("hook_mlp_out"), hidden[2] - mid, atol=1e-5, rtol=1e-5)
    norm = model.get_decoder().layers[1].post_attention_layernorm if arch == "llama" \
        else model.transformer.h[1].ln_2
    with torch.no_grad():
        torch.testing.assert_close(at("hook_mlp_in"), norm(mid))
        torch.testing.assert_close(at("ln2.hook_normalized"), norm(mid))
    assert lens_point(model, "blocks.1.mlp.hook_post") == hook_point(model, 1)
    # sparsify names modules under the base model: layers.1 / h.1 is the residual after layer 1
    block = "layers.1" if arch == "llama" else "h.1"
    torch.testing.assert_close(read(model, {1: module_point(model, block, "output")}, ids), hidden[2])
    for bad in ("blocks.1.attn.hook_z", "blocks.1.hook_nonsense", "resid_post"):
        with pytest.raises(SubjectError, match="cannot read the TransformerLens hook"):
            lens_point(model, bad)
    with pytest.raises(SubjectError, match="Layer 9 is out of range"):
        lens_point(model, "blocks.9.hook_resid_post")
    with pytest.raises(SubjectError, match="has no module 'layers.9.mlpx'"):
        module_point(model, "layers.9.mlpx", "output")


def test_both_formats_encode_as_their_libraries_define(tmp_path):
    """Each format and architecture against its definition: sae_lens standard (ReLU of
    (x - b_dec) W_enc + b_enc), top-k, JumpReLU and the transcoder (no - b_dec); sparsify's top-k
    of ReLU(enc(x - b_dec)) and its transcoder."""
    W_enc, b_enc, W_dec, b_dec = random_weights(1)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(2))
    pre = (x - b_dec) @ W_enc + b_enc
    pre_t = x @ W_enc + b_enc

    def topk(p, k):
        values, idx = p.relu().topk(k, dim=-1)
        return torch.zeros_like(p).scatter(-1, idx, values)

    threshold = torch.rand(LATENTS, generator=torch.Generator().manual_seed(3))
    cases = {
        "standard": (sae_lens_files(tmp_path / "s", "blocks.1.hook_resid_post", W_enc, b_enc, W_dec, b_dec),
                     pre.relu()),
        "topk": (sae_lens_files(tmp_path / "k", "blocks.1.hook_resid_post", W_enc, b_enc, W_dec, b_dec,
                                "topk", k=4), topk(pre, 4)),
        "jumprelu": (sae_lens_files(tmp_path / "j", "blocks.1.hook_resid_post", W_enc, b_enc, W_dec, b_dec,
                                    "jumprelu", threshold), pre.relu() * (pre > threshold)),
        "transcoder": (sae_lens_files(tmp_path / "t", "blocks.1.hook_mlp_in", W_enc, b_enc, W_dec, b_dec,
                                      "transcoder"), pre_t.relu()),
        "pre-6.0 topk": (tmp_path / "old", topk(pre, 5)),
        "sparsify": (sparsify_files(tmp_path / "layers.1", W_enc, b_enc, W_dec, b_dec, 6), topk(pre, 6)),
        "sparsify transcoder": (sparsify_files(tmp_path / "layers.2.mlp", W_enc, b_enc, W_dec, b_dec, 3,
                                               transcode=True), topk(pre_t, 3)),
    }
    old = sae_lens_files(tmp_path / "old", "", W_enc, b_enc, W_dec, b_dec)   # sae_lens before 6.0
    cfg = json.loads((old / "cfg.json").read_text())
    del cfg["metadata"], cfg["architecture"]
    (old / "cfg.json").write_text(json.dumps(cfg | {"hook_name": "blocks.1.hook_resid_post",
                                                    "activation_fn_str": "topk",
                                                    "activation_fn_kwargs": {"k": 5}}))
    for name, (path, expected) in cases.items():
        coder = load_coder(path)
        torch.testing.assert_close(coder.encode(x), expected, msg=name)
        assert coder.width == LATENTS and torch.equal(coder.W_dec, W_dec), name
    assert load_coder(tmp_path / "layers.1").layer == 1 and load_coder(tmp_path / "layers.2.mlp").layer == 2
    assert load_coder(tmp_path / "layers.2.mlp").transcoder


def planted_sae(model, path: Path, token_ids: list[int]) -> tuple[Path, set[int], torch.Tensor, float]:
    """An SAE at the residual stream before layer 0 (the token embeddings) whose latent 0 fires
    on the tokens whose embedding leans furthest along a random direction: a latent wired to a
    token set, with its exact activation known for every token. Latent 5 never fires; the
others are random."""
    W_enc, b_enc, W_dec, b_dec = random_weights(4)
    b_dec.zero_()
    embed = model.get_input_embeddings().weight.detach()
    u = torch.randn(D, generator=torch.Generator().manual_seed(5))
    lean = embed[token_ids] @ u
    tau = float(lean.quantile(0.9))
    W_enc[:, 0], b_enc[0] = u, -tau
    b_enc[5] = -1e6   # latent 5 is dead
    wired = {t for t, v in zip(token_ids, lean.tolist()) if v > tau}
    sae_lens_files(path, "blocks.0.hook_resid_pre", W_enc, b_enc, W_dec, b_dec)
    return path, wired, u, tau


def test_a_planted_latent_is_recovered_through_the_pipeline(tiny_llama, tiny_llama_dir, tiny_tokenizer,
                                                             tmp_path):
    """`neuronlens subject=sae`: the recorded latent fires exactly on its token set with its
    known activation, the row carries its decoder row's logits and its density, a dead latent
is a counted failure without a call to any LLM, and a second
    SAE file (other weights) is recorded anew, not read from the cache."""
    from itertools import islice

    from neuronlens.corpus import BuiltinCorpus
    from neuronlens.subject.logits import direction_logits
    from neuronlens.subject.recording import Recording

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(islice(BuiltinCorpus().texts(), 60)))
    seen = sorted({t for text in corpus.read_text().split("\n\n") for t in tiny_tokenizer.encode(text)})
    sae, wired, u, tau = planted_sae(tiny_llama, tmp_path / "sae", seen)
    cfg = config(["subject=sae", f"subject.model={tiny_llama_dir}", f"subject.path={sae}",
                  "subject.device=cpu", "corpus=files", f"corpus.paths=[{corpus}]",
                  f"explainer.model={tiny_llama_dir}", f"simulator.model={tiny_llama_dir}",
                  "neurons.which=list", "neurons.indices=[0,3,5]", "recording.top_k=8",
                  "recording.n_random=6", "recording.window=16", "explain.max_tokens=8", "progress=false"])
    summary = pipeline.run(cfg, tmp_path / "run")
    out = {r["index"]: r for r in rows(tmp_path / "run")}
    assert sorted(out) == [0, 3, 5] and {r["layer"] for r in out.values()} == {0}
    assert out[5]["error_kind"] == "dead_unit" and out[5]["density"] == 0   # no LLM call for it
    assert out[5]["usage"] == {"explainer": [0, 0], "simulator": [0, 0]}
    assert "SAE sae" in summary["subject"]
    rec = Recording.load(tmp_path / "run" / "recording")
    embed = tiny_llama.get_input_embeddings().weight.detach()
    i = rec.neurons.index(next(n for n in rec.neurons if n.index == 0))
    tops = rec.top_tokens[i]
    assert len(tops) == 8
    for tokens, acts in zip(tops, rec.top_acts[i]):
        expected = (embed[tokens.long()] @ u - tau).relu()
        torch.testing.assert_close(acts, expected, atol=1e-4, rtol=1e-4)
        assert {int(t) for t, a in zip(tokens, acts) if a > 0} <= wired
        assert acts.max() > 0   # the top excerpts are where it fires
    assert 0 < out[0]["density"] < 0.5
    W_dec = load_coder(sae).W_dec
    logits = direction_logits(tiny_llama, tiny_tokenizer, W_dec[[0]], [0])[0]
    assert out[0]["logits"] == json.loads(json.dumps(logits))
    # other weights in the same place: a new key, so recorded anew
    W_enc, b_enc, W_dec2, b_dec = random_weights(9)
    sae_lens_files(sae, "blocks.0.hook_resid_pre", W_enc, b_enc, W_dec2, b_dec)
    pipeline.run(cfg, tmp_path / "run2")
    again = Recording.load(tmp_path / "run2" / "recording")
    assert not torch.equal(again.top_acts, rec.top_acts)


def test_sae_settings_are_refused_before_the_model_loads(tiny_llama_dir, tmp_path, monkeypatch, caplog):
    """Each unusable SAE or setting: one line, from the files alone."""
    from omegaconf import OmegaConf

    import neuronlens.subject.transformer as transformer

    monkeypatch.setattr(transformer, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    W_enc, b_enc, W_dec, b_dec = random_weights(6)
    neurons = lambda **kw: OmegaConf.create({"layers": None, "which": "random", "per_layer": 2,
                                             "indices": None} | kw)

    def refused(path, match, **kw):
        with pytest.raises(SubjectError, match=match) as info:
            SAESubject(str(tiny_llama_dir), str(path)).check(neurons(**kw))
        assert "\n" not in str(info.value)

    ok = sae_lens_files(tmp_path / "ok", "blocks.1.hook_resid_post", W_enc, b_enc, W_dec, b_dec)
    SAESubject(str(tiny_llama_dir), str(ok)).check(neurons())
    refused(ok, "asks for layer 2, but the SAEs .* read layer 1", layers=[2])
    refused(ok, "Latent index 24 is out of range: the SAE at layer 1 has 24 latents", which="list",
            indices=[3, 24])
    refused(sae_lens_files(tmp_path / "gated", "blocks.1.hook_resid_post", W_enc, b_enc, W_dec, b_dec,
                           "gated"), "architecture 'gated'")
    refused(sae_lens_files(tmp_path / "norm", "blocks.1.hook_resid_post", W_enc, b_enc, W_dec, b_dec,
                           normalize_activations="expected_average_only_in"), "normalises its input")
    refused(sae_lens_files(tmp_path / "z", "blocks.1.attn.hook_z", W_enc, b_enc, W_dec, b_dec), "hook_z")
    refused(sae_lens_files(tmp_path / "deep", "blocks.7.hook_resid_post", W_enc, b_enc, W_dec, b_dec),
            "reads layer 7 .* the model has 3 layers")
    wide = random_weights(7, d_in=48)
    refused(sae_lens_files(tmp_path / "wide", "blocks.1.hook_resid_post", *wide),
            "reads vectors of width 48 .* the model's are 32 wide")
    processed = sae_lens_files(tmp_path / "tl", "blocks.1.hook_resid_post", W_enc, b_enc, W_dec, b_dec)
    cfg = json.loads((processed / "cfg.json").read_text())
    cfg["metadata"]["model_from_pretrained_kwargs"] = {"center_writing_weights": True}
    (processed / "cfg.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        load_coder(processed)
    assert "center_writing_weights=True" in caplog.text   # read as is, with a warning
    refused(tmp_path / "nothing", "not a folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "holds no SAE")
    both = tmp_path / "two"
    sparsify_files(both / "layers.1", W_enc, b_enc, W_dec, b_dec, 4)
    sparsify_files(both / "layers.1.mlp", W_enc, b_enc, W_dec, b_dec, 4, transcode=True)
    refused(both, "Two SAEs .* read layer 1")
    torn = sae_lens_files(tmp_path / "torn", "blocks.1.hook_resid_post", W_enc, b_enc, W_dec, b_dec)
    (torn / "cfg.json").write_text("{")
    refused(torn, "Cannot read the SAE config")
    # a folder of sparsify hookpoints is one SAE per layer
    many = tmp_path / "many"
    sparsify_files(many / "layers.0", W_enc, b_enc, W_dec, b_dec, 4)
    sparsify_files(many / "layers.2", W_enc, b_enc, W_dec, b_dec, 4)
    assert sorted(load_coders(many)) == [0, 2]
    assert SAESubject(str(tiny_llama_dir), str(many)).select(neurons(), 0) == \
        SAESubject(str(tiny_llama_dir), str(many)).select(neurons(layers=[0, 2]), 0)


@pytest.mark.peers
def test_saes_written_by_sae_lens_and_sparsify_encode_as_they_do(tmp_path):
    """Round trip through the libraries themselves (tests/sae_peers.py, a venv of their own): an
    SAE of each architecture saved by sae-lens (standard, top-k with and without decoder-norm
    rescaling, JumpReLU, the three transcoders) and by sparsify (SAE, transcoder), read by
    neuronlens, encodes a batch as the library's own ``encode`` did."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).parent))
    import sae_peers

    if not sae_peers.python().exists():
        if os.environ.get("NEURONLENS_REQUIRE_PEERS"):
            pytest.fail(f"no peers venv at {sae_peers.VENV}: run python tests/sae_peers.py install")
        pytest.skip("no peers venv: python tests/sae_peers.py install")
    subprocess.run([str(sae_peers.python()), str(Path(sae_peers.__file__)), "write", str(tmp_path)],
                   check=True, env=os.environ | {"WANDB_MODE": "disabled"})
    expected = load_file(tmp_path / "expected.safetensors")
    x = expected.pop("x")
    assert len(expected) == 9
    for name, latents in expected.items():
        path = tmp_path / name
        coder = load_coder(path / "layers.1" if name.startswith("sparsify") else path)
        assert coder.transcoder == ("transcoder" in name), name
        assert coder.layer == 1
        assert (latents > 0).any(), name   # a check of something
        torch.testing.assert_close(coder.encode(x), latents, atol=1e-5, rtol=1e-5, msg=name)


def test_a_transcoder_run_exports_as_neuronpedia_uploads_it(tiny_llama, tiny_llama_dir, corpus40, tmp_path,
                                                            monkeypatch):
    """A sparsify transcoder (a folder of hookpoints, `layers.1.mlp`) through the pipeline: its
    latents are its encoder on the MLP's input. `neuronlens-report RUN --neuronpedia OUT` then
    writes the request bodies Neuronpedia's upload takes; the `neuronpedia` package, given the
    same features as its own objects, sends exactly those bodies (to a local server here:
    nothing reaches Neuronpedia)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    pytest.importorskip("neuronpedia")
    from neuronpedia.np_activation import Activation
    from neuronpedia.np_explanation import Explanation
    from neuronpedia.np_feature import Feature, Logit
    from neuronpedia.requests.feature_request import FeatureRequest

    from neuronlens.report.cli import main as report

    W_enc, b_enc, W_dec, b_dec = random_weights(8)
    sae = tmp_path / "transcoders"
    sparsify_files(sae / "layers.1.mlp", W_enc, b_enc, W_dec, b_dec, 5, transcode=True)
    run = tmp_path / "run"
    pipeline.run(config(["subject=sae", f"subject.model={tiny_llama_dir}", f"subject.path={sae}",
                         "subject.device=cpu", "corpus=files", f"corpus.paths=[{corpus40}]",
                         f"explainer.model={tiny_llama_dir}", f"simulator.model={tiny_llama_dir}",
                         "neurons.per_layer=3", "recording.top_k=6", "recording.n_random=4",
                         "recording.window=16", "explain.max_tokens=8", "judge_power.enabled=false",
                         "~judges", "progress=false"]), run)
    from neuronlens.subject.recording import Recording

    rec = Recording.load(run / "recording")
    coder, got = load_coders(sae)[1], []
    with torch.no_grad(), neuron_hooks(tiny_llama, [1], lambda _l, a: got.append(coder.encode(a)),
                                       {1: module_point(tiny_llama, "layers.1.mlp", "input")}):
        tiny_llama(input_ids=rec.top_tokens[0, :2].long())
    torch.testing.assert_close(rec.top_acts[0, :2], got[0][..., rec.neurons[0].index], atol=1e-5, rtol=1e-5)
    report([str(run), "--neuronpedia", str(tmp_path / "np"), "--neuronpedia-model", "tiny-llama",
            "--source-set", "res-test"])
    files = sorted((tmp_path / "np").rglob("*.json"))
    assert [f.relative_to(tmp_path / "np").as_posix() for f in files] == ["1-res-test/batch-000.json"]
    body = json.loads(files[0].read_text())
    assert body["modelId"] == "tiny-llama" and body["source"] == "1-res-test" and len(body["features"]) == 3
    for feature in body["features"]:
        assert feature["activations"] and len(feature["topLogits"]) == 10
        assert all(len(a["tokens"]) == len(a["values"]) == 16 for a in feature["activations"])

    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):   # noqa: N802
            received.append((self.path, self.headers["X-Api-Key"],
                             json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(FeatureRequest, "BASE_URL", f"http://127.0.0.1:{server.server_port}/api")
    try:
        ours = [Feature(modelId=body["modelId"], source=body["source"], index=f["index"], density=f["density"],
                        top_logits=[Logit(**l) for l in f["topLogits"]],
                        bottom_logits=[Logit(**l) for l in f["bottomLogits"]],
                        explanations=[Explanation(body["modelId"], body["source"], f["index"], e["text"],
                                                  e["methodName"], e["modelName"]) for e in f["explanations"]],
                        activations=[Activation(body["modelId"], body["source"], f["index"], a["tokens"],
                                                a["values"]) for a in f["activations"]])
                for f in body["features"]]
        FeatureRequest(api_key="test-key").upload_batch(body["modelId"], body["source"], ours)
    finally:
        server.shutdown()
    assert received == [("/api/feature/upload-batch", "test-key", body)]
