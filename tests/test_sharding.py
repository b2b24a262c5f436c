"""Sharding neurons across multirun jobs with the joblib launcher, and merging the shards back:
the merged result is one unsharded run's, neuron for neuron, up to float32 rounding (the promise
and its bounds: tests/agreement.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuronlens.pipeline import shard
from neuronlens.errors import UserError
from neuronlens.records import NeuronId
from neuronlens.report.cli import main as report_main
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
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}   # Ray phones home unless told not to
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def rows(run_dir: Path) -> dict[tuple[int, int], dict]:
    out = {}
    for line in (run_dir / "neurons.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[(row["layer"], row["index"])] = row
    return out


LAUNCHERS = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    # the SLURM code path of hydra-submitit-launcher, run as local processes
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                       "hydra.launcher.cpus_per_task=1"],
    # a Ray started by the launcher for the sweep, on loopback only, without its dashboard
    "ray": ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
            "+hydra.launcher.ray.init.include_dashboard=false",
            "+hydra.launcher.ray.init._node_ip_address=127.0.0.1",
            "+hydra.launcher.ray.remote.num_cpus=1"],
}


@pytest.mark.parametrize("launcher", [
    "joblib", *(pytest.param(name, marks=pytest.mark.scale) for name in ("submitit_local", "ray"))])
def test_shards_merge_to_the_unsharded_run(launcher, sharp_llama_dir, tmp_path):
    """Rule neurons (exact true activations) simulated by a model whose predictions vary: the
    scores are well conditioned, so the shards' and the whole run's can be compared. Each
    launcher runs the shards as its jobs; the report's merge gives the whole run's rows."""
    from itertools import islice

    from neuronlens.corpus import BuiltinCorpus

    if launcher != "joblib":
        pytest.importorskip(f"hydra_plugins.hydra_{launcher.split('_')[0]}_launcher",
                            reason=f"the {launcher} launcher is in the `scale` extra")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(islice(BuiltinCorpus().texts(), 40)))
    app(tmp_path, sharp_llama_dir, corpus, *LAUNCHERS[launcher],
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
    assert_rows_agree(parts[0] | parts[1], whole)
    report_main([str(tmp_path / "sweep"), "--merge", str(tmp_path / "merged")])
    (merged,) = (tmp_path / "merged").iterdir()
    assert json.loads((merged / "summary.json").read_text())["n_neurons"] == len(whole)
    assert_rows_agree(rows(merged), whole)
