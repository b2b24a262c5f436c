"""Sharding neurons across multirun jobs with the joblib launcher, and merging the shards back:
the merged result is one unsharded run's, neuron for neuron, up to float32 rounding (the promise
and its bounds: tests/agreement.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from neuronlens.pipeline import shard
from neuronlens.errors import UserError
from neuronlens.records import NeuronId
from agreement import assert_rows_agree, extra_overrides


def test_shards_partition_the_neurons():
    neurons = [NeuronId(l, i) for l in (1, 2) for i in range(5)]
    parts = [shard(neurons, i, 3) for i in range(3)]
    assert sorted(n for p in parts for n in p) == sorted(neurons)
    assert shard(neurons, None, 1) == neurons
    with pytest.raises(UserError, match="neurons.shard"):
        shard(neurons, 3, 3)


def app(tmp_path: Path, model_dir: Path, corpus: Path, *overrides: str, multirun=False) -> None:
    cmd = [sys.executable, "-m", "neuronlens", *(["-m"] if multirun else []),
           "subject=synthetic", f"subject.tokenizer={model_dir}",
           "corpus=files", f"corpus.paths=[{corpus}]", "explainer=truth",
           f"simulator.model={model_dir}", "simulator.device=cpu", "recording.window=16",
           "recording.top_k=8", "recording.n_random=8", "progress=false", *extra_overrides(), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def rows(run_dir: Path) -> dict[tuple[int, int], dict]:
    out = {}
    for line in (run_dir / "neurons.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[(row["layer"], row["index"])] = row
    return out


def test_joblib_shards_merge_to_the_unsharded_run(sharp_llama_dir, tmp_path):
    """Rule neurons (exact true activations) simulated by a model whose predictions vary: the
    scores are well conditioned, so the shards' and the whole run's can be compared."""
    from itertools import islice

    from neuronlens.corpus import BuiltinCorpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(islice(BuiltinCorpus().texts(), 40)))
    app(tmp_path, sharp_llama_dir, corpus, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "neurons.shard=0,1", "neurons.n_shards=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        multirun=True)
    app(tmp_path, sharp_llama_dir, corpus, f"hydra.run.dir={tmp_path / 'whole'}")
    shards = [tmp_path / "sweep" / str(i) for i in range(2)]
    summaries = [json.loads((d / "summary.json").read_text()) for d in shards]
    assert [s["shard"] for s in summaries] == [[0, 2], [1, 2]]
    assert len({s["experiment"] for s in summaries}) == 1  # one experiment, two shards
    parts = [rows(d) for d in shards]
    assert not set(parts[0]) & set(parts[1])
    whole = rows(tmp_path / "whole")
    merged = parts[0] | parts[1]
    assert_rows_agree(merged, whole)
