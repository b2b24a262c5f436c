"""Concept neurons: the probe finds a planted neuron, steering overwrites exactly what it clamps,
bad datasets fail with one clear line, and the whole `neuronlens-probe` run writes its report."""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import neuronlens.probe.settings  # noqa: F401 - registers probe.yaml's schema with Hydra

from agreement import REL
from neuronlens.conf import CONF_DIR
from neuronlens.errors import UserError
from neuronlens.probe import data as probe_data
from neuronlens.probe.activations import columns, pooled_activations
from neuronlens.probe.fit import Threshold, _thresholds, best_single, fit_l1
from neuronlens.probe.run import run
from neuronlens.probe.steer import clamped, parse_neurons
from neuronlens.probe.trace import render
from neuronlens.records import NeuronId
from neuronlens.subject.hooks import neuron_hooks

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
PLANTED = NeuronId(1, 17)
NEUTRAL = [" the", " of", " and", " to", " in", " is", " was", " a", " that", " it", " for",
           " on", " with", " as", " by", " at", " from", " this", " be", " or"]
CONCEPT = [" water", " music", " river"]


def concept_ids(tokenizer) -> set[int]:
    """Token ids of the concept words that no neutral word uses."""
    ids = lambda words: {i for w in words for i in tokenizer(w, add_special_tokens=False)["input_ids"]}  # noqa: E731
    return ids(CONCEPT) - ids(NEUTRAL) - ids([w.strip() for w in NEUTRAL])


def plant(model, ids: set[int]):
    """A copy of the tiny Llama whose neuron PLANTED fires exactly at the tokens ``ids``.

    Residual dimension 0 carries the token-set indicator: the embedding has 1 there for ``ids`` and
    0 elsewhere, and no layer up to PLANTED writes to it. The neuron's gate and up rows read only
    that dimension, so its activation silu(4x)*4x is large at those tokens and exactly 0 at others;
    it writes nothing downstream, so no later neuron can copy it.
    """
    model = copy.deepcopy(model)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[sorted(ids), 0] = 1.0
        for layer in model.model.layers[:PLANTED.layer + 1]:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        mlp = model.model.layers[PLANTED.layer].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[PLANTED.index] = 0.0
            proj.weight[PLANTED.index, 0] = 4.0
        mlp.down_proj.weight[:, PLANTED.index] = 0.0
    return model


def texts(n: int, seed: int) -> list[tuple[str, int]]:
    """Neutral word salad; half of the texts hold one concept word (label 1)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(5, 10))]
        if i % 2:
            words.insert(rng.randint(1, len(words)), rng.choice(CONCEPT))
        out.append(("".join(words).strip(), i % 2))
    return out


@pytest.fixture(scope="module")
def planted(tiny_llama, tiny_tokenizer):
    ids = concept_ids(tiny_tokenizer)
    assert ids, "the tiny tokenizer should have tokens for the concept words"
    return plant(tiny_llama, ids)


@pytest.fixture(scope="module")
def planted_dir(planted, tiny_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("planted")
    planted.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def split(rows) -> probe_data.Split:
    return probe_data.Split([t for t, _ in rows], np.array([y for _, y in rows]))


def test_probe_recovers_the_planted_neuron(planted, tiny_tokenizer):
    layers = [0, 1, 2]
    X = {name: pooled_activations(planted, tiny_tokenizer, [t for t, _ in rows], layers)
         for name, rows in (("train", texts(120, 0)), ("valid", texts(40, 1)), ("test", texts(40, 2)))}
    y = {name: np.array([lab for _, lab in rows]) for name, rows in
         (("train", texts(120, 0)), ("valid", texts(40, 1)), ("test", texts(40, 2)))}
    neurons = columns(planted, layers)
    probe = fit_l1(X["train"], y["train"], X["valid"], y["valid"], [0.01, 0.1, 1.0])
    assert neurons[probe.top(1)[0]] == PLANTED
    assert probe.accuracy(X["test"], y["test"]) >= 0.95
    single = best_single(X["train"], y["train"], X["valid"], y["valid"])
    assert neurons[single.column] == PLANTED
    assert single.accuracy(X["test"], y["test"]) == 1.0


def test_pooling_reads_only_each_texts_own_tokens(tiny_llama, tiny_tokenizer):
    """Batched with padding gives the same numbers as one text at a time, for every pooling."""
    sample = ["the river", "a much longer text that is in the corpus of the test", "of"]
    for pooling in ("mean", "max", "last"):
        batched = pooled_activations(tiny_llama, tiny_tokenizer, sample, [0, 2], pooling)
        alone = np.vstack([pooled_activations(tiny_llama, tiny_tokenizer, [t], [0, 2], pooling)
                           for t in sample])
        # float32 along two paths (padded batch, one text): within REL of the scale (tests/agreement.py)
        np.testing.assert_allclose(batched, alone, rtol=0, atol=REL * np.abs(alone).max())


def test_single_neuron_threshold_is_the_best_possible():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 12))
        X, y = rng.integers(0, 4, (n, 3)).astype(float), rng.integers(0, 2, n)
        acc, thr, sign = _thresholds(X, y)
        for j in range(3):
            cuts = np.concatenate([X[:, j] - 0.5, X[:, j] + 0.5])
            best = max(max(np.mean((X[:, j] > c) == y), np.mean((X[:, j] < c) == y)) for c in cuts)
            assert acc[j] == pytest.approx(best)
            assert Threshold(j, thr[j], sign[j], acc[j]).accuracy(X, y) == pytest.approx(best)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_steering_changes_exactly_the_clamped_activation(name, request):
    model = request.getfixturevalue(name)
    ids = torch.tensor([[5, 17, 99, 42, 7, 300]])
    target = [NeuronId(1, 3), NeuronId(1, 40)]

    def capture():
        seen = {}
        with neuron_hooks(model, [0, 1, 2], lambda layer, acts: seen.__setitem__(layer, acts.clone())):
            model(input_ids=ids)
        return seen

    with torch.no_grad():
        before = capture()
        with clamped(model, target, 8.0):
            after = capture()
    assert torch.equal(before[0], after[0])                          # upstream: untouched
    cols = [n.index for n in target]
    assert torch.all(after[1][..., cols] == 8.0)                    # the clamped neurons
    others = [i for i in range(after[1].shape[-1]) if i not in cols]
    assert torch.equal(before[1][..., others], after[1][..., others])  # the rest of their layer
    assert not torch.equal(before[2], after[2])                     # and the effect flows on
    with torch.no_grad():
        assert torch.equal(capture()[1], before[1])                 # the hook is gone afterwards


def test_steer_neuron_spec():
    assert parse_neurons([3, 4]) == [NeuronId(3, 4)]
    assert parse_neurons([[3, 4], [5, 6]]) == [NeuronId(3, 4), NeuronId(5, 6)]
    with pytest.raises(UserError, match="steer.neuron"):
        parse_neurons([[3, 4, 5]])


def test_trace_page_escapes_text_and_colours_by_sign():
    page = render("t", "n", [(["<script>", " ok", " zero"], [-2.0, 2.0, 0.0])], ["<b>caption</b>"])
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;" in page
    assert "rgba(220, 40, 40, 1.000)\">&lt;script&gt;" in page
    assert "rgba(30, 170, 60, 1.000)\"> ok" in page and "rgba(30, 170, 60, 0.000)\"> zero" in page


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


@pytest.mark.parametrize("rows, header, message", [
    ([("good film", 1), ("bad film", 0)], ("text", "label"), "no column 'sentence'"),
    ([("good film", 1), ("fine film", 1)], ("sentence", "label"), "single label value"),
    ([], ("sentence", "label"), "holds no rows"),
    ([("a", 0), ("b", 1), ("c", 2)], ("sentence", "label"), "exactly two"),
])
def test_bad_dataset_is_one_clear_error(tmp_path, rows, header, message):
    path = write_tsv(tmp_path / "train.tsv", rows, header)
    with pytest.raises(UserError, match=message):
        probe_data.build(probe_data.read_file(str(path), "sentence", "label"), None, None)


def test_other_dataset_errors(tmp_path):
    train = [("good", "1"), ("bad", "0")] * 5
    with pytest.raises(UserError, match="label values \\['7'\\]"):
        probe_data.build(train, [("odd", "7")], None)
    with pytest.raises(UserError, match="does not exist"):
        probe_data.read_file(str(tmp_path / "missing.tsv"), "sentence", "label")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(UserError, match=".tsv, .csv or .jsonl"):
        probe_data.read_file(str(tmp_path / "x.parquet"), "sentence", "label")


def test_files_of_every_format_and_the_default_splits(tmp_path):
    rows = texts(20, 0)
    tsv = write_tsv(tmp_path / "a.tsv", [('he said "hi', 1), ("plain", 0)])
    (tmp_path / "b.csv").write_text("sentence,label\n" + "".join(f'"{t}, x",{y}\n' for t, y in rows))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"sentence": t, "label": y}) + "\n"
                                              for t, y in rows))
    assert probe_data.read_file(str(tsv), "sentence", "label")[0] == ('he said "hi', "1")
    csv_rows = probe_data.read_file(str(tmp_path / "b.csv"), "sentence", "label")
    assert csv_rows[0] == (rows[0][0] + ", x", str(rows[0][1]))
    ds = probe_data.build(csv_rows, None, None, valid_fraction=0.25)
    assert len(ds.train) == 15 and len(ds.valid) == 5 and ds.test is ds.valid
    assert not set(ds.train.texts) & set(ds.valid.texts)
    ds = probe_data.build(probe_data.read_file(str(tmp_path / "c.jsonl"), "sentence", "label"),
                          csv_rows, None, positive="0")
    assert ds.classes == ("1", "0") and ds.train.labels.sum() == 10


def probe_config(tmp_path: Path, model_dir: Path, corpus: Path, extra=()):
    rows = texts(80, 0)
    write_tsv(tmp_path / "train.tsv", rows)
    write_tsv(tmp_path / "test.tsv", texts(30, 2))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="probe", overrides=[
            f"subject.model={model_dir}", "subject.device=cpu", "progress=false",
            f"probe.train={tmp_path / 'train.tsv'}", f"probe.test={tmp_path / 'test.tsv'}",
            "probe.text=sentence", "probe.curve.seeds=2", "probe.Cs=[0.1,1.0]",
            "corpus=files", f"corpus.paths=[{corpus}]",
            f"explainer.model={model_dir}", f"simulator.model={model_dir}",
            "recording.top_k=8", "recording.n_random=8", "recording.window=16",
            "explain.max_tokens=8", "steer.values=[-5,5]", "steer.seeds=2",
            "steer.max_new_tokens=4", "steer.prompts=[the,of a]", *extra])


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(t for t, _ in texts(200, 5)))
    return path


def test_run_writes_the_report_and_finds_the_planted_neuron(planted_dir, corpus, tmp_path):
    cfg = probe_config(tmp_path, planted_dir, corpus, ["probe.explain=1", "probe.top=3"])
    result = run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    saved = json.loads((out / "probe.json").read_text())
    assert {"test_accuracy", "single_neuron_test_accuracy", "n_nonzero", "top_neurons"} <= set(saved)
    top = saved["top_neurons"][0]
    assert (top["layer"], top["index"]) == (PLANTED.layer, PLANTED.index)
    assert saved["single_neuron_test_accuracy"] == 1.0 and saved["test_accuracy"] >= 0.9
    assert "explanation" in top and "score" in top
    assert json.loads((out / "neurons.jsonl").read_text().splitlines()[0])["index"] == PLANTED.index
    assert {r["n"] for r in saved["curve"]} == {8, 16, 32, 64}
    steering = saved["steering"]
    assert [r["value"] for r in steering["rows"]] == [None, -5, 5]
    assert all(r["n"] == 4 and 0 <= r["p_concept"] <= 1 for r in steering["rows"])
    for r in steering["rows"][1:]:   # each clamp against the unsteered texts, pair by pair
        e = r["vs_unsteered"]
        base = [g["p_concept"] for g in steering["rows"][0]["generations"]]
        mine = [g["p_concept"] for g in r["generations"]]
        assert e["n"] == 4 and e["difference"] == pytest.approx(sum(mine) / 4 - sum(base) / 4)
        assert e["ci"] is None or e["ci"][0] <= e["difference"] <= e["ci"][1]
    for name in ("report.md", "curve.png", "trace.html"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## Steering" in report and f"L{PLANTED.layer}/N{PLANTED.index}" in report
    assert result["test_accuracy"] == saved["test_accuracy"]


@pytest.mark.parametrize("override, message", [
    ("probe.layers=[7]", "Layer 7 is out of range"),
    ("steer.neuron=[1,999]", "Neuron index 999 is out of range"),
    ("probe.trace.neuron=[9,0]", "Layer 9 is out of range"),
    ("probe.pooling=median", "probe.pooling must be one of"),
])
def test_bad_layer_or_neuron_fails_before_any_work(planted_dir, corpus, tmp_path, override, message):
    cfg = probe_config(tmp_path, planted_dir, corpus, [override])
    with pytest.raises(UserError, match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "probe.json").exists()


def test_command_line_error_is_one_line(planted_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "from neuronlens.probe.cli import main; main()",
         f"subject.model={planted_dir}", f"probe.train={tmp_path / 'nope.tsv'}",
         f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("neuronlens: error: Dataset file")


@pytest.mark.slow
def test_embedded_model_on_a_small_sst2_sample(tmp_path):
    if not (SST2 / "train.tsv").exists():
        pytest.skip(f"no SST-2 at {SST2}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="probe", overrides=[
            f"probe.train={SST2 / 'train.tsv'}", f"probe.test={SST2 / 'dev.tsv'}",
            "probe.text=sentence", "probe.max_train=200", "probe.max_valid=100",
            "probe.max_test=100", "probe.layers=[8,12]", "probe.explain=1",
            "probe.curve.sizes=[8,32,200]", "probe.curve.seeds=2", "probe.Cs=[0.1,1.0]",
            "recording.max_windows=64", "explain.max_tokens=16", "steer.values=[-8,8]",
            "steer.prompts=[The movie was]", "steer.seeds=2", "steer.max_new_tokens=8",
            "progress=false"])
    result = run(cfg, tmp_path / "run")
    assert result["test_accuracy"] > 0.6
    assert result["top_neurons"][0].get("explanation") is not None
    assert (tmp_path / "run" / "report.md").exists()


def test_hf_dataset_splits(monkeypatch):
    import datasets

    rows = {"train": [{"sentence": t, "label": y} for t, y in texts(30, 0)],
            "validation": [{"sentence": t, "label": y} for t, y in texts(10, 1)],
            "test": [{"sentence": t, "label": -1} for t, _ in texts(10, 2)]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: rows[split])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="probe", overrides=[
            "probe.data=hf", "probe.name=stanfordnlp/sst2", "probe.valid=validation",
            "probe.text=sentence"])
    ds = probe_data.load(cfg.probe)
    assert (len(ds.train), len(ds.valid)) == (30, 10) and ds.test is ds.valid
    cfg.probe.test = "test"  # SST-2's test labels are hidden (-1): said, not silently used
    with pytest.raises(UserError, match="test split has label values \\['-1'\\]"):
        probe_data.load(cfg.probe)
    cfg.probe.text = "text"
    with pytest.raises(UserError, match="no column 'text'"):
        probe_data.load(cfg.probe)
