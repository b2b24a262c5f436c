"""Recording on tiny random GPT-2 and Llama models, checked against brute force.

The brute force runs one forward pass per window and computes each neuron from the MLP's input by
hand (GPT-2: act(c_fc(x)); Llama: act_fn(gate_proj(x)) * up_proj(x)), so it shares no code with
the hooks or the running top-k under test.
"""

from __future__ import annotations

import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats as sps

import neuronlens.subject.transformer as transformer
from neuronlens.records import NeuronId, NeuronRecord
from neuronlens.subject.hooks import neuron_hooks
from neuronlens.models import load_model
from neuronlens.models import raw_bytes
from neuronlens.subject.recording import Recording, RecordingConfig, record, select
from neuronlens.subject.transformer import recording_for, select_neurons
from agreement import REL


def tol(acts) -> float:
    """Activations recorded in batches against a forward pass of their own: float32 along two
    paths, so within REL of their scale (tests/agreement.py), never equal."""
    return REL * float(np.abs(np.asarray(acts)).max())


ARCHS = ["gpt2", "llama"]
LAYERS = [0, 2]
N_WINDOWS, WINDOW = 40, 16
CONFIG = RecordingConfig(top_k=5, n_random=6, batch_size=7)


def _mlp(model, layer: int):
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].mlp
    return model.model.layers[layer].mlp


def _manual_neurons(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    mlp = _mlp(model, layer)
    if model.config.model_type == "gpt2":
        return mlp.act(mlp.c_fc(x))
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


@torch.no_grad()
def _brute_force(model, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Every neuron of ``layers`` at every token: {layer: [B, T, neurons]}, from the MLP input."""
    inputs: dict[int, torch.Tensor] = {}
    handles = [_mlp(model, l).register_forward_pre_hook(
        lambda _m, args, l=l: inputs.__setitem__(l, args[0].detach())) for l in layers]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {l: _manual_neurons(model, l, inputs[l]) for l in layers}


def _model(request, arch: str):
    return request.getfixturevalue(f"tiny_{arch}")


def _windows(model, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, WINDOW), generator=g).tolist()


def _all_neurons(model) -> list[NeuronId]:
    width = _mlp(model, 0).c_fc.nf if model.config.model_type == "gpt2" \
        else _mlp(model, 0).up_proj.out_features
    neurons = [NeuronId(l, i) for l in LAYERS for i in range(width)]
    random.Random(0).shuffle(neurons)  # interleave layers: the output order must follow this list
    return neurons


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run ~50x faster on one thread than on contended CPU threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=ARCHS)
def recorded(_one_thread, request, tiny_tokenizer):
    """(model, windows, neurons, recording, brute-force activations [N, W, T] as float64 numpy)."""
    model = _model(request, request.param)
    windows = _windows(model, N_WINDOWS, seed=1)
    neurons = _all_neurons(model)
    rec = record(model, tiny_tokenizer, windows, neurons, CONFIG, progress=False)
    per_window = [_brute_force(model, torch.tensor([w]), LAYERS) for w in windows]
    acts = np.stack([np.stack([pw[n.layer][0, :, n.index].numpy() for pw in per_window])
                     for n in neurons]).astype(np.float64)                     # [N, W, T]
    return model, windows, neurons, rec, acts


def test_shapes_and_counts(recorded):
    model, windows, neurons, rec, _ = recorded
    N, k, R = len(neurons), CONFIG.top_k, CONFIG.n_random
    assert rec.neurons == neurons
    assert tuple(rec.top_tokens.shape) == (N, k, WINDOW)
    assert tuple(rec.top_acts.shape) == (N, k, WINDOW)
    assert tuple(rec.top_max.shape) == (N, k)
    assert tuple(rec.random_tokens.shape) == (R, WINDOW)
    assert tuple(rec.random_acts.shape) == (N, R, WINDOW)
    assert rec.n_tokens == N_WINDOWS * WINDOW
    assert rec.meta["config"]["top_k"] == k


def test_top_k_matches_brute_force(recorded):
    _, windows, neurons, rec, acts = recorded
    where = {tuple(w): j for j, w in enumerate(windows)}
    assert len(where) == len(windows)
    window_max = acts.max(axis=2)                                               # [N, W]
    expected = -np.sort(-window_max, axis=1)[:, :CONFIG.top_k]
    np.testing.assert_allclose(rec.top_max.numpy(), expected, atol=tol(acts), rtol=0)
    for i in range(len(neurons)):
        chosen = [where.get(tuple(t)) for t in rec.top_tokens[i].tolist()]
        assert None not in chosen, f"neuron {i}: a top excerpt is not a corpus window"
        assert len(set(chosen)) == CONFIG.top_k, f"neuron {i}: a window was kept twice"
        np.testing.assert_allclose(rec.top_acts[i].numpy(), acts[i, chosen], atol=tol(acts), rtol=0)
        np.testing.assert_allclose(rec.top_acts[i].numpy().max(axis=1), rec.top_max[i].numpy(),
                                   atol=1e-6, rtol=0)


def test_moments_match_numpy_and_scipy(recorded):
    _, _, neurons, rec, acts = recorded
    for i in range(len(neurons)):
        a = acts[i].ravel()
        got = rec.stats(i)
        assert got["mean"] == pytest.approx(a.mean(), rel=1e-5, abs=1e-7)
        assert got["variance"] == pytest.approx(a.var(), rel=1e-4, abs=1e-9)
        assert got["skewness"] == pytest.approx(sps.skew(a, bias=True), rel=1e-3, abs=1e-4)
        assert got["kurtosis"] == pytest.approx(sps.kurtosis(a, fisher=True, bias=True),
                                                rel=1e-3, abs=1e-4)
        # the density: the fraction of tokens above 0 (a token within float noise of 0 may differ)
        near = np.abs(a) <= tol(a)
        assert (a > 0)[~near].sum() <= rec.density(i) * a.size <= (a > 0).sum() + near.sum()
        assert rec.neuron_record(i).density == rec.density(i)


def test_random_sample_holds_real_windows_with_their_activations(recorded):
    _, windows, neurons, rec, acts = recorded
    where = {tuple(w): j for j, w in enumerate(windows)}
    chosen = [where.get(tuple(t)) for t in rec.random_tokens.tolist()]
    assert None not in chosen
    assert len(set(chosen)) == CONFIG.n_random
    np.testing.assert_allclose(rec.random_acts.numpy(), acts[:, chosen], atol=tol(acts), rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_sample_deterministic_in_seed(request, tiny_tokenizer, arch):
    model = _model(request, arch)
    windows = _windows(model, N_WINDOWS, seed=2)
    neurons = [NeuronId(1, 0), NeuronId(1, 3)]

    def sample(seed: int) -> list[list[int]]:
        cfg = RecordingConfig(top_k=2, n_random=6, batch_size=7, seed=seed)
        return record(model, tiny_tokenizer, windows, neurons, cfg, progress=False
                      ).random_tokens.tolist()

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


@pytest.mark.parametrize("arch", ARCHS)
def test_fewer_windows_than_k_and_n_random(request, tiny_tokenizer, arch):
    model = _model(request, arch)
    windows = _windows(model, 4, seed=3)
    neurons = [NeuronId(0, 5), NeuronId(2, 1)]
    rec = record(model, tiny_tokenizer, windows, neurons, CONFIG, progress=False)
    # every window is in the random sample, in corpus order
    assert rec.random_tokens.tolist() == windows
    brute = _brute_force(model, torch.tensor(windows), [0, 2])
    for i, n in enumerate(neurons):
        torch.testing.assert_close(rec.random_acts[i], brute[n.layer][..., n.index],
                                   atol=tol(brute[n.layer]), rtol=0)
        assert torch.isinf(rec.top_max[i, 4:]).all() and torch.isfinite(rec.top_max[i, :4]).all()
        nr = rec.neuron_record(i)
        assert len(nr.most_positive_activation_records) == 4
        assert len(nr.random_sample) == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_independent_of_corpus_length(request, tiny_tokenizer, arch):
    """What the recorder holds (every tensor reachable from it, and every Python object it keeps)
    is the same after 10 and after 80 batches: it keeps top-k, reservoir and moments, never the
    corpus's activations."""
    import sys

    from neuronlens.subject.recording import Recorder

    def held(recorder) -> tuple[int, int]:
        tensors = [v for v in vars(recorder).values() if isinstance(v, torch.Tensor)]
        tensors += list(recorder.state.values())
        others = [v for v in vars(recorder).values() if isinstance(v, (list, dict, tuple))]
        return (sum(t.numel() * t.element_size() for t in tensors),
                sum(sys.getsizeof(o) + sum(sys.getsizeof(x) for x in o) for o in others))

    neurons = [NeuronId(l, i) for l in LAYERS for i in range(8)]
    recorder = Recorder(neurons, CONFIG)
    sizes = []
    for batch in range(80):
        ids = torch.randint(0, 100, (CONFIG.batch_size, WINDOW))
        recorder.add(ids, torch.randn(len(neurons), CONFIG.batch_size, WINDOW))
        if batch + 1 in (10, 80):
            sizes.append(held(recorder))
    assert recorder.n_tokens == 80 * CONFIG.batch_size * WINDOW
    assert sizes[0] == sizes[1] and sizes[0][0] > 0
    rec = record(_model(request, arch), tiny_tokenizer, _windows(_model(request, arch), 80, seed=4),
                 neurons, CONFIG, progress=False)
    assert rec.top_acts.shape == (len(neurons), CONFIG.top_k, WINDOW)


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_deliver_the_manual_mlp_activation(request, arch):
    model = _model(request, arch)
    ids = torch.tensor(_windows(model, 3, seed=5))
    got: dict[int, torch.Tensor] = {}

    def read(layer, acts):
        got[layer] = acts.detach().clone()

    n_hooks = len(_all_hooks(model))
    with torch.no_grad(), neuron_hooks(model, LAYERS, read):
        expected = _brute_force(model, ids, LAYERS)
    assert set(got) == set(LAYERS)
    for l in LAYERS:
        assert got[l].shape == expected[l].shape
        torch.testing.assert_close(got[l], expected[l], atol=tol(expected[l]), rtol=0)
    assert len(_all_hooks(model)) == n_hooks  # all handles removed on exit


def _all_hooks(model) -> list:
    return [h for m in model.modules()
            for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_can_overwrite_and_are_removed_after_an_error(request, arch):
    model = _model(request, arch)
    ids = torch.tensor(_windows(model, 2, seed=6))
    mlp = _mlp(model, 1)
    out: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda _m, _i, o: out.append(o.detach()))
    try:
        with torch.no_grad(), neuron_hooks(model, [1], lambda _l, a: torch.zeros_like(a)):
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    # with every neuron zeroed the MLP's output is its down projection's bias (none for Llama)
    bias = mlp.c_proj.bias if arch == "gpt2" else torch.zeros(model.config.hidden_size)
    torch.testing.assert_close(out[0], bias.expand_as(out[0]), atol=1e-6, rtol=0)

    n_hooks = len(_all_hooks(model))
    with pytest.raises(RuntimeError, match="boom"):
        with neuron_hooks(model, LAYERS, lambda _l, _a: None):
            assert len(_all_hooks(model)) == n_hooks + len(LAYERS)
            raise RuntimeError("boom")
    assert len(_all_hooks(model)) == n_hooks


# ---------------------------------------------------------------------------------------------
# Saving, loading, exporting


def test_save_load_round_trip(recorded, tmp_path):
    *_, rec, _ = recorded
    rec.save(tmp_path / "rec")
    back = Recording.load(tmp_path / "rec")
    for name in ("top_tokens", "top_acts", "top_max", "random_tokens", "random_acts", "moments"):
        a, b = getattr(rec, name), getattr(back, name)
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    assert back.neurons == rec.neurons
    assert back.token_strings == rec.token_strings
    assert back.n_tokens == rec.n_tokens
    assert back.meta == rec.meta
    assert back.stats(3) == rec.stats(3)


def test_neuron_record_is_sorted_and_decoded(recorded, tiny_tokenizer):
    _, windows, neurons, rec, acts = recorded
    where = {tuple(w): j for j, w in enumerate(windows)}
    decoded = {tuple(tiny_tokenizer.decode([t]) for t in w): j for j, w in enumerate(windows)}
    for i in (0, len(neurons) // 2, len(neurons) - 1):
        nr = rec.neuron_record(i)
        assert nr.neuron_id == neurons[i]
        tops = nr.most_positive_activation_records
        assert len(tops) == CONFIG.top_k
        maxes = [r.max_activation for r in tops]
        assert maxes == sorted(maxes, reverse=True)
        assert maxes[0] == pytest.approx(acts[i].max(), abs=tol(acts))
        for r in tops + nr.random_sample:
            j = decoded[tuple(r.tokens)]
            np.testing.assert_allclose(r.activations, acts[i, j], atol=tol(acts), rtol=0)
        assert len(nr.random_sample) == CONFIG.n_random
        assert nr.mean == rec.stats(i)["mean"] and nr.kurtosis == rec.stats(i)["kurtosis"]
    assert len(where) == len(decoded)


def test_export_openai_writes_loadable_files(recorded, tmp_path):
    *_, neurons, rec, _ = recorded
    paths = rec.export_openai(tmp_path / "out")
    expected = {tmp_path / "out" / str(n.layer) / f"{n.index}.json" for n in neurons}
    assert set(paths) == expected
    assert {p for p in (tmp_path / "out").rglob("*.json")} == expected
    for i in (0, 7):
        n = neurons[i]
        loaded = NeuronRecord.load(tmp_path / "out" / str(n.layer) / f"{n.index}.json")
        assert loaded.to_json() == rec.neuron_record(i).to_json()


# ---------------------------------------------------------------------------------------------
# The recording cache used by the pipeline


def _settings(cache: bool = True):
    """The run's ``recording`` block."""
    return OmegaConf.create({"window": 16, "max_windows": 30, "top_k": 4, "n_random": 5,
                             "batch_size": 8, "cache": cache})


def test_each_layer_is_recorded_once_for_any_of_its_units(tiny_llama_dir, tmp_path, monkeypatch):
    """A layer is recorded once, every unit of it: a later run on other units of that layer, or
    a shard of a sharded run, selects its rows from the cache and runs no forward pass."""
    from neuronlens.corpus import BuiltinCorpus, FilesCorpus

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(list(BuiltinCorpus(max_texts=15).texts())))
    model, tokenizer = load_model(str(tiny_llama_dir), "cpu", "float32")
    neurons = [NeuronId(1, 0), NeuronId(1, 7), NeuronId(2, 3)]

    def record_into(run: str, units=neurons, cache: bool = True):
        return recording_for(str(tiny_llama_dir), model, tokenizer, units, FilesCorpus([str(text)]),
                             _settings(cache), 0, tmp_path / run)

    calls = []
    real_record = transformer.record

    def counted(*a, **kw):
        calls.append(len(a[3]))   # the units recorded
        return real_record(*a, **kw)

    monkeypatch.setattr(transformer, "record", counted)
    first = record_into("run1")
    assert calls == [2 * 64]   # both layers whole, in one pass over the corpus
    assert (tmp_path / "run1" / "recording" / "manifest.json").exists()
    assert first.n_tokens == 30 * 16 and first.neurons == neurons

    def no_record(*_a, **_kw):
        raise AssertionError("recorded again instead of using the cache")

    monkeypatch.setattr(transformer, "record", no_record)
    second = record_into("run2")
    for name in ("top_tokens", "top_acts", "top_max", "random_tokens", "random_acts", "moments"):
        assert torch.equal(getattr(first, name).cpu(), getattr(second, name)), name
    assert second.neurons == neurons and second.token_strings == first.token_strings

    others = [NeuronId(2, 3), NeuronId(1, 40), NeuronId(1, 7)]   # other units, another order
    picked = record_into("run3", others)
    assert picked.neurons == others
    # each unit's rows are what recording that unit alone gives
    monkeypatch.setattr(transformer, "record", real_record)
    alone = record_into("run4", others, cache=False)
    for name in ("top_tokens", "top_acts", "top_max", "random_tokens", "random_acts"):
        assert torch.equal(getattr(picked, name), getattr(alone, name)), name
    # float32 sums per batch over a whole layer's rows or over three: the same terms, another
    # reduction order
    assert torch.allclose(picked.moments, alone.moments, rtol=1e-6, atol=0)

    # a changed corpus file records again
    monkeypatch.setattr(transformer, "record", counted)
    text.write_text(text.read_text() + "\nOne more sentence about the weather in spring.")
    record_into("run5")
    assert calls == [2 * 64, 2 * 64]


def test_the_cache_key_follows_the_weights(tiny_llama_dir, tmp_path):
    """A checkpoint rewritten at the same path is a new identity (its weight files' stamps)."""
    from neuronlens.models import weights_identity

    copy = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, copy)
    before = weights_identity(str(copy))
    assert before == weights_identity(str(copy))
    weights = next(f for f in copy.iterdir() if f.name.endswith(".safetensors"))
    weights.write_bytes(weights.read_bytes())   # the same bytes, written again a second later
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert weights_identity(str(copy)) != before


# ---------------------------------------------------------------------------------------------
# Which neurons


def test_select_neurons(tiny_llama):
    m = tiny_llama  # 3 layers of 64 neurons
    assert select_neurons(m, [0, 2], 3, "first", [], 0) == [
        NeuronId(l, i) for l in (0, 2) for i in range(3)]
    assert select_neurons(m, None, 2, "first", [], 0) == [NeuronId(1, 0), NeuronId(1, 1)]
    assert select_neurons(m, [1], 100, "first", [], 0) == [NeuronId(1, i) for i in range(64)]
    assert select_neurons(m, [2, 0], 1, "list", [5, 3, 5], 0) == [
        NeuronId(2, 5), NeuronId(2, 3), NeuronId(0, 5), NeuronId(0, 3)]

    picked = select_neurons(m, [0, 2], 6, "random", [], 7)
    assert picked == select_neurons(m, [0, 2], 6, "random", [], 7)
    assert picked != select_neurons(m, [0, 2], 6, "random", [], 8)
    for l in (0, 2):
        idx = [n.index for n in picked if n.layer == l]
        assert len(idx) == 6 and idx == sorted(set(idx)) and all(0 <= i < 64 for i in idx)
    assert [n.index for n in picked if n.layer == 0] != [n.index for n in picked if n.layer == 2]
    assert {n.layer for n in select_neurons(m, None, 4, "random", [], 0)} == {1}
    assert len(select_neurons(m, [0], 1000, "random", [], 0)) == 64


SPLIT_TEXT = "Mitochondria 🙂 and 日本語 at a café, naïve\n\tend"


@pytest.mark.parametrize("name", ["tiny_tokenizer", "smollm2_tokenizer"])
def test_raw_bytes_spell_every_token_of_a_text(request, name):
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer(SPLIT_TEXT, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)   # some character is split
    assert b"".join(raw_bytes(tokenizer, i) for i in ids) == SPLIT_TEXT.encode()


def test_sentencepiece_byte_tokens_are_their_byte():
    class SentencePieceLike:
        @staticmethod
        def convert_ids_to_tokens(i):
            return {1: "<0xE6>", 2: "\u2581the"}[i]

    assert raw_bytes(SentencePieceLike(), 1) == b"\xe6"
    assert raw_bytes(SentencePieceLike(), 2) is None   # not a byte token: its text is its own


def test_a_recording_reads_split_characters_whole(tiny_llama, tiny_tokenizer, tmp_path):
    ids = tiny_tokenizer(SPLIT_TEXT, add_special_tokens=False)["input_ids"]
    rec = record(tiny_llama, tiny_tokenizer, [ids], [NeuronId(0, 0)],
                 RecordingConfig(top_k=1, n_random=1, batch_size=1), progress=False)
    rec.save(tmp_path / "rec")   # the bytes survive a save and a load
    excerpt = Recording.load(tmp_path / "rec").neuron_record(0).most_positive_activation_records[0]
    assert "\ufffd" in "".join(excerpt.tokens)             # what the simulator sees is unchanged
    assert len(excerpt.text) == len(excerpt.tokens) and "".join(excerpt.text) == SPLIT_TEXT
    assert "" in excerpt.text                               # the later bytes of a split character
    assert "text" not in excerpt.to_json()                  # OpenAI's format has no such field


def test_quantile_samples_bin_each_units_excerpts_by_their_max(tiny_llama, tiny_tokenizer, tmp_path):
    """recording.quantiles: the boundaries are, per unit, the grid edges at which i/Q of its
    excerpts have their max at or below (checked against every window's activations, computed
    here); each bin holds min(per_quantile, its windows) distinct windows of that bin with their
    true activations; the samples survive save, load, select and OpenAI's format, and the seed
    decides them."""
    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.subject.recording import QUANTILE_EDGES

    windows = list(token_windows(BuiltinCorpus(max_texts=40), tiny_tokenizer, 16, 120))
    units = [NeuronId(1, i) for i in (0, 5, 9)]
    config = RecordingConfig(top_k=4, n_random=5, batch_size=8, seed=3, quantiles=5, per_quantile=6)
    rec = record(tiny_llama, tiny_tokenizer, lambda: iter(windows), units, config, progress=False)
    every = []
    with torch.no_grad(), neuron_hooks(tiny_llama, [1], lambda _l, a: every.append(a[..., [0, 5, 9]])):
        for start in range(0, len(windows), 8):
            tiny_llama(input_ids=torch.tensor(windows[start:start + 8]))
    acts = torch.cat(every).permute(2, 0, 1)            # [units, windows, tokens]
    maxes = acts.amax(2)
    grid = QUANTILE_EDGES.tolist()
    assert rec.quantile_boundaries.shape == (3, 4) and rec.quantile_windows.shape == (3, 5, 6)
    for n in range(3):
        bounds = rec.quantile_boundaries[n].tolist()
        for i, b in enumerate(bounds, start=1):
            below = lambda edge: float((maxes[n] <= edge).float().mean())
            assert b in grid and below(b) >= i / 5
            if grid.index(b) > 0:
                assert below(grid[grid.index(b) - 1]) < i / 5
        edges = [-math.inf, *bounds, math.inf]
        for q in range(5):
            members = [w for w in range(len(windows)) if edges[q] < maxes[n, w] <= edges[q + 1]]
            rows = [int(r) for r in rec.quantile_windows[n, q] if r >= 0]
            assert len(rows) == len(set(rows)) == min(6, len(members))
            for r, a in zip(rows, rec.quantile_acts[n, q]):
                tokens = rec.windows[r].tolist()
                match = [w for w in members if windows[w] == tokens]
                assert match and torch.allclose(a, acts[n, match[0]], atol=1e-5)
    assert sum(len(b) for b in rec.neuron_record(0).random_sample_by_quantile) == \
        int((rec.quantile_windows[0] >= 0).sum())

    rec.save(tmp_path / "rec")
    again = Recording.load(tmp_path / "rec")
    part = select([again], [units[2], units[0]])
    assert part.neuron_record(1).to_json() == rec.neuron_record(0).to_json()
    assert part.neuron_record(0).to_json() == rec.neuron_record(2).to_json()
    path = rec.export_openai(tmp_path / "openai")[1]
    loaded = NeuronRecord.load(path)
    assert loaded.quantile_boundaries == rec.quantile_boundaries[1].tolist()
    assert [[r.tokens for r in b] for b in loaded.random_sample_by_quantile] == \
        [[r.tokens for r in b] for b in rec.neuron_record(1).random_sample_by_quantile]
    other = record(tiny_llama, tiny_tokenizer, lambda: iter(windows), units,
                   RecordingConfig(top_k=4, n_random=5, batch_size=8, seed=4, quantiles=5, per_quantile=6),
                   progress=False)
    assert torch.equal(other.quantile_boundaries, rec.quantile_boundaries)
    assert not torch.equal(other.quantile_acts, rec.quantile_acts)   # another seed, other samples
    with pytest.raises(ValueError, match="two passes"):
        record(tiny_llama, tiny_tokenizer, windows, units, config, progress=False)
