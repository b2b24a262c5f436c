"""Integration: the main job on the embedded model, exactly as a user runs it (`pytest -m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_default_run_end_to_end_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "neuronlens", f"hydra.run.dir={run_dir}", "progress=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "neurons.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_neurons"] == len(rows) == 8
    scored = [r for r in rows if r.get("score") is not None]
    assert len(scored) >= 6, summary  # a tiny explainer may fail on a neuron or two, never silently
    assert summary["n_failed"] == 8 - len(scored)
    for r in scored:
        assert -1.0 <= r["score"] <= 1.0 and r["explanation"]
        assert r["test_excerpts"] and all(len(e["tokens"]) == 64 for e in r["test_excerpts"])
    assert (run_dir / "recording" / "arrays.safetensors").exists()
    # the similarity judge scores every kept explanation too, on the same excerpts
    assert all(len(r["judges"]["similarity"]["test_simulated"]) == len(r["test_excerpts"]) for r in scored)
    assert summary["judges"]["similarity"]["n"] == sum(
        r["judges"]["similarity"]["score"] is not None for r in scored)

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "neurons.jsonl").read_text().count("\n") == 8  # resumed: nothing redone


def test_embedded_subject_records_and_exports(tmp_path):
    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.subject.transformer import select_neurons
    from neuronlens.records import NeuronRecord
    from neuronlens.models import load_model
    from neuronlens.subject.recording import RecordingConfig, record

    model, tokenizer = load_model("embedded", "cpu")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    neurons = select_neurons(model, [3], 4, "first", [], 0)
    windows = token_windows(BuiltinCorpus(), tokenizer, 64, max_windows=40)
    rec = record(model, tokenizer, windows, neurons, RecordingConfig(top_k=8, n_random=8),
                 progress=False)
    paths = rec.export_openai(tmp_path)
    loaded = NeuronRecord.load(paths[0])
    assert len(loaded.most_positive_activation_records) == 8
    assert loaded.most_positive_activation_records[0].max_activation > 0
    assert "".join(loaded.random_sample[0].tokens).strip()


def test_an_sae_trained_offline_is_interpreted_through_the_pipeline(tmp_path):
    """`neuronlens-sae` trains a top-k SAE on the embedded model's middle layer with sparsify's own
    trainer (two epochs here, to keep the suite short), states its fraction of variance explained
    and its dead latents, and `neuronlens subject=sae` explains and scores its latents, each row
    with the output side of its decoder row."""
    pytest.importorskip("sparsify", reason="the sae extra")
    sae_dir = tmp_path / "sae-run"
    cmd = ["neuronlens-sae", "sae.epochs=2", f"hydra.run.dir={sae_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads((sae_dir / "summary.json").read_text())
    assert trained["hookpoint"] == "layers.15" and trained["latents"] == 576 * 8
    assert 0.5 < trained["fraction_of_variance_explained"] <= 1
    assert 0 <= trained["dead_latents"] < trained["latents"]
    assert "subject.path=" in done.stdout

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "neuronlens", "subject=sae", f"subject.path={sae_dir / 'sae'}",
           "neurons.per_layer=3", "judge_power.enabled=false", "~judges", f"hydra.run.dir={run_dir}",
           "progress=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "neurons.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(rows) == 3 and {r["layer"] for r in rows} == {15}
    assert "SAE" in summary["subject"]
    for r in rows:
        assert len(r["logits"]["promoted"]) == 10 and 0 <= r["density"] < 1
    assert [r for r in rows if r.get("score") is not None], "no latent was scored"
