"""neuronlens-report: from a real multirun on tiny models, from shards, and from hand-made runs
whose numbers are checked against scipy computed here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from scipy import stats as sp

import neuronlens.pipeline as pipeline
from neuronlens.conf import CONF_DIR
from neuronlens.report.cli import main as report_main
from agreement import assert_means_agree, assert_rows_agree, extra_overrides


def tiny_overrides(model_dir: Path, corpus: Path, simulator: Path | None = None) -> list[str]:
    return [f"subject.model={model_dir}", "subject.device=cpu", "corpus=files", f"corpus.paths=[{corpus}]",
            f"explainer.model={model_dir}", f"simulator.model={simulator or model_dir}", "neurons.layers=[1]",
            "neurons.per_layer=4", "recording.top_k=12", "recording.n_random=12", "recording.window=16",
            "explain.max_tokens=8", "progress=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One corpus file for the module, so that runs on one subject share a cached recording."""
    from neuronlens.corpus import BuiltinCorpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(islice(BuiltinCorpus().texts(), 60)))
    return path


def read_rows(run_dir: Path) -> list[dict]:
    """Rows in the report's order, (layer, index): bootstrap intervals depend on the order."""
    rows = [json.loads(line) for line in (run_dir / "neurons.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["layer"], r["index"]))


def ci_text(values) -> str:
    res = sp.bootstrap((np.asarray(values),), np.mean, n_resamples=10_000, method="percentile",
                       random_state=np.random.default_rng(0))
    return f"{np.mean(values):.3f} [{res.confidence_interval.low:.3f}, {res.confidence_interval.high:.3f}]"


def report(run_root: Path, *args: str) -> tuple[str, str]:
    report_main([str(run_root), "--no-sites", *args])
    return (run_root / "report.md").read_text(), (run_root / "report.html").read_text()


# --- a real Hydra multirun -------------------------------------------------------------------------

def test_report_from_a_real_multirun(tiny_llama_dir, tiny_gpt2_dir, corpus, tmp_path):
    sweep = tmp_path / "multirun"
    overrides = [o for o in tiny_overrides(tiny_llama_dir, corpus) if not o.startswith(("subject.model", "explain."))]
    proc = subprocess.run(
        [sys.executable, "-m", "neuronlens", "-m", f"subject.model={tiny_llama_dir},{tiny_gpt2_dir}",
         "explain.max_tokens=4,8", *overrides, f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if (p / "summary.json").exists())
    assert len(runs) == 4
    md, html = report(sweep)
    assert "neuronlens -m" in md and "explain.max_tokens=4,8" in md  # the command that made it
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        choices = summary["choices"]
        assert choices["explainer"] == "local" and choices["subject"] == "smollm2"
        max_tokens = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        label = (f"subject={choices['subject']}({Path(summary['subject']).name}) corpus=files "
                 f"explainer=local({Path(summary['explainer']).name}) "
                 f"{next(o for o in max_tokens if o.startswith('explain.max_tokens'))} "
                 f"judge=local({Path(summary['simulator']).name})")
        assert label in md and label in html
        scores = [r["score"] for r in read_rows(run) if r["score"] is not None]
        assert ci_text(scores) in md and ci_text(scores) in html  # mean and CI computed here
    assert "## Paired differences" in md and "Explainers compared (same judge)" in md
    judges = {name for run in runs for r in read_rows(run) for name in r.get("judges") or {}}
    assert md.count("explain.max_tokens=4 (judge=") == 2 * (1 + len(judges))  # per subject and judge
    if judges:  # the default second judge: a result of its own, and its agreement with the simulator
        assert "judge=similarity" in md and "| same run |" in md
    assert "**not pairable**" in md and "group 2:" in md  # two subjects never mixed
    assert (sweep / "means.png").exists() and "data:image/png;base64," in html
    assert "<script" not in html


# --- shards ----------------------------------------------------------------------------------------

def tiny_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_shards_merge_to_the_unsharded_numbers(tiny_llama_dir, sharp_llama_dir, corpus, tmp_path, capsys):
    # a simulator whose predictions vary, so that the scores can be compared (tests/agreement.py)
    base = tiny_overrides(tiny_llama_dir, corpus, simulator=sharp_llama_dir) + extra_overrides()
    whole = pipeline.run(tiny_config(base), tmp_path / "whole" / "run")
    for i in range(2):
        shard = base + [f"neurons.shard={i}", "neurons.n_shards=2"]
        pipeline.run(tiny_config(shard), tmp_path / "sharded" / str(i))
        (tmp_path / "sharded" / str(i) / ".hydra").mkdir()  # as the Hydra app writes it
        (tmp_path / "sharded" / str(i) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(shard))
    md_whole, _ = report(tmp_path / "whole")
    md_sharded, _ = report(tmp_path / "sharded")
    # each report's numbers from its own rows: a shard's floats may differ from the whole run's
    # in the last bits, and a mean printed to 3 decimals could round the other way
    sharded_rows = sorted((r for i in range(2) for r in read_rows(tmp_path / "sharded" / str(i))),
                          key=lambda r: (r["layer"], r["index"]))
    for md, rows in ((md_whole, read_rows(tmp_path / "whole" / "run")), (md_sharded, sharded_rows)):
        assert ci_text([r["score"] for r in rows if r["score"] is not None]) in md
    assert "Warnings" not in md_sharded
    power = md_whole.split("## Judge power")[1].split("## ")[0]   # one row per judge of the run
    assert power.count("tell them apart") + power.count("tells them apart") == 1 + len(whole["judges"])

    report_main([str(tmp_path / "sharded"), "--merge", str(tmp_path / "merged")])
    merged = [p for p in (tmp_path / "merged").iterdir()]
    assert len(merged) == 1
    summary = json.loads((merged[0] / "summary.json").read_text())
    assert summary["n_neurons"] == whole["n_neurons"] == 4 and summary["shard"] is None
    # a shard simulates its neurons after other kept prompt prefixes than the whole run: the same
    # numbers up to float32 rounding, within bounds derived from the values themselves
    key = lambda r: (r["layer"], r["index"])  # noqa: E731
    bounds = assert_rows_agree({key(r): r for r in read_rows(merged[0])},
                               {key(r): r for r in read_rows(tmp_path / "whole" / "run")})
    assert_means_agree(summary["mean_score"], whole["mean_score"], bounds["simulator"])
    for name, judged in whole.get("judges", {}).items():  # the default second judge, if any
        assert_means_agree(summary["judges"][name]["mean_score"], judged["mean_score"], bounds.get(name, []))
    assert all("neurons.shard" not in o for o in yaml.safe_load((merged[0] / ".hydra" / "overrides.yaml").read_text()))

    (tmp_path / "sharded" / "1" / "summary.json").unlink()  # shard 1 unfinished
    md_half, _ = report(tmp_path / "sharded")
    assert "shard(s) [1] of 2 missing" in md_half and "is unfinished" in md_half


# --- hand-made runs: judges, baselines, synthetic neurons, pairing rules ------------------------------

def fake_run(path: Path, *, subject: str, explainer: str, scores: list, judge: list | None = None,
             model: str = "model-x", tokens: str = "a", shard=None, experiment: str | None = None,
             first: int = 0) -> Path:
    path.mkdir(parents=True)
    rows = []
    for i, s in enumerate(scores, first):
        row = {"layer": i % 2, "index": i, "score": s, "explanation": f"{explainer} says {i}",
               "scores": {"test": None if s is None else {"all": {"correlation": s}}},
               "test_excerpts": [{"kind": "top", "tokens": [tokens, str(i)], "true": [0, 1], "simulated": [0, 1]}],
               "usage": {"explainer": [100, 10], "simulator": [300, 0]},
               "failures": {"explanations": 0, "excerpts": 1 if s is None else 0}, "seconds": 1.0}
        if judge is not None:
            row["judges"] = {"similarity": {"score": judge[i - first], "scores": {"test": {}},
                                            "test_simulated": [[0.0, 1.0]],
                                            "failed_excerpts": 0, "usage": [0, 0]}}
        rows.append(row)
    (path / "neurons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    choices = {"subject": subject, "corpus": "builtin", "explainer": explainer, "simulator": "local"}
    setup = {"subject": {"model": model}, "corpus": {"name": "builtin"}, "recording": {}, "scoring": {"split_seed": 0}}
    summary = {"n_neurons": len(rows), "n_failed": sum(s is None for s in scores), "mean_score": None,
               "n_failed_excerpts": sum(s is None for s in scores), "n_failed_explanations": 0,
               "tokens": {}, "wall_seconds": 2.0 * len(rows), "subject": model,
               "explainer": None if explainer in ("truth", "top_tokens", "shuffled") else "embedded",
               "simulator": "embedded", "choices": choices,
               "experiment": experiment or f"{subject}-{explainer}-{tokens}", "shard": shard,
               "remote": {"explainer": None, "simulator": None}}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "experiment.json").write_text(json.dumps(setup))
    return path


@pytest.fixture
def bench(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "bench"
    n = 12
    truth = list(rng.uniform(0.6, 0.9, n))
    local = list(np.array(truth) - rng.uniform(0.1, 0.4, n))
    runs = {"truth": truth, "local": local, "shuffled": list(rng.uniform(-0.2, 0.2, n)),
            "top_tokens": list(rng.uniform(0.0, 0.3, n))}
    for i, (explainer, scores) in enumerate(runs.items()):
        judge = list(np.array(scores) * 0.8 + rng.normal(0, 0.05, n))
        fake_run(root / str(i), subject="synthetic", explainer=explainer, scores=scores, judge=judge)
    # same subject and recording, but other test excerpts: cannot pair with the runs above
    fake_run(root / "4", subject="synthetic", explainer="openai", scores=local, tokens="b")
    # another subject (model), in two shards of three, one neuron failed
    scores = list(rng.uniform(0, 0.5, 6))
    scores[2] = None
    fake_run(root / "5", subject="smollm2", explainer="local", scores=scores[:3], model="<b>other</b>",
             shard=[0, 3], experiment="sharded")
    fake_run(root / "6", subject="smollm2", explainer="local", scores=scores[3:], model="<b>other</b>",
             shard=[1, 3], experiment="sharded", first=3)
    (root / "7").mkdir()
    (root / "7" / "neurons.jsonl").write_text("")  # unfinished
    return root


def rows_of(root: Path, run: str, judge: str | None = None) -> list[float]:
    out = []
    for r in read_rows(root / run):
        s = r["score"] if judge is None else r["judges"][judge]["score"]
        if s is not None:
            out.append(s)
    return out


def test_report_sections_and_numbers(bench):
    md, html = report(bench)
    for title in ("## Results", "## Baselines", "## Synthetic neurons", "## Paired differences", "## Not pairable",
                  "## Simulator agreement", "## Plots", "## Runs", "## Warnings"):
        assert title in md
    for run in ("0", "1", "2", "3"):
        assert ci_text(rows_of(bench, run)) in md  # the main judge
        assert ci_text(rows_of(bench, run, "similarity")) in md  # the second judge, a result of its own
    assert "judge=similarity" in md and "judge=local(embedded)" in md
    assert "| shuffled (baseline) |" in md and "| top_tokens (baseline) |" in md

    # each explainer minus each baseline, same judge, paired
    local, shuffled = rows_of(bench, "1"), rows_of(bench, "2")
    diff = np.array(local) - np.array(shuffled)
    assert f"{diff.mean():.3f} [" in md
    assert f"{sp.wilcoxon(local, shuffled).pvalue:.4f}" in md
    assert f"{sp.ttest_rel(local, shuffled).pvalue:.4f}" in md or sp.ttest_rel(local, shuffled).pvalue < 1e-4

    # synthetic: the truth's score per judge, and each explainer against it
    truth = rows_of(bench, "0")
    ratio = np.mean(local) / np.mean(truth)
    assert f"| {ratio:.3f} |" in md
    assert f"{np.mean(np.array(local) - truth):.3f} [" in md

    # agreement: the main simulator and the second judge on the same explanations
    rho = sp.spearmanr(rows_of(bench, "1"), rows_of(bench, "1", "similarity")).statistic
    cell = re.search(rf"\| same run \| 12 \| {rho:.3f} \[(-?[\d.]+), (-?[\d.]+)\] \|", md)
    assert cell and float(cell[1]) <= rho <= float(cell[2])   # with its bootstrap interval

    # pairing rules: another subject is another group; other excerpts pair on no neuron
    assert "group 2:" in md and "**not pairable**" in md
    openai_id = next(line.split(":")[0].strip("- ") for line in md.splitlines() if "explainer=openai" in line
                     and line.startswith("- R"))
    assert f"{openai_id} vs" in md or f"vs {openai_id}" in md
    assert "12 other excerpts" in md

    # shards merged, the missing one and the unfinished run said
    assert "shard(s) [2] of 3 missing" in md and "7 is unfinished" in md
    sharded = sorted((r["layer"], r["index"], r["score"]) for run in ("5", "6") for r in read_rows(bench / run))
    assert ci_text([s for *_, s in sharded if s is not None]) in md and "| 6 | 1 |" in md  # 6 neurons, 1 failed

    # HTML: the same numbers, names escaped, figures inline
    assert ci_text(local) in html and "&lt;b&gt;other&lt;/b&gt;" in html and "<b>other</b>" not in html
    assert html.count("data:image/png;base64,") == 3
    assert all((bench / f).exists() for f in ("means.png", "by_layer.png", "histograms.png"))


def test_report_out_folder_and_clear_errors(bench, tmp_path, capsys):
    report_main([str(bench), "--no-sites", "--out", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "report.md").exists() and not (bench / "report.md").exists()
    assert (tmp_path / "elsewhere" / "means.png").exists()
    for missing in (tmp_path / "nope", tmp_path / "empty"):
        if missing.name == "empty":
            missing.mkdir()
        with pytest.raises(SystemExit) as exit_info:
            report_main([str(missing)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("neuronlens: error:") and len(err.splitlines()) == 1


def test_every_finished_run_gets_its_viewer_and_export(bench, monkeypatch, capsys):
    import types

    calls = []
    site = types.ModuleType("neuronlens.report.site")
    site.write_site = lambda run_dir, out_dir=None: (calls.append(("site", run_dir.name)),
                                                     run_dir / "viewer" / "index.html")[1]
    export = types.ModuleType("neuronlens.report.openai_format")
    export.export_run = lambda run_dir, out_dir=None: (calls.append(("openai", run_dir.name)),
                                                       [run_dir / "openai" / "1" / "2.jsonl"])[1]
    monkeypatch.setitem(sys.modules, "neuronlens.report.site", site)
    monkeypatch.setitem(sys.modules, "neuronlens.report.openai_format", export)
    (bench / "0" / "viewer").mkdir()
    (bench / "0" / "viewer" / "index.html").write_text("<html></html>")
    report_main([str(bench)])
    finished = {str(i) for i in range(7)}  # run 7 is unfinished
    assert {name for kind, name in calls if kind == "site"} == finished
    assert {name for kind, name in calls if kind == "openai"} == finished
    # it says every file and folder it wrote
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "Wrote:"
    for name in ("report.md", "report.html", "means.png", "by_layer.png", "histograms.png"):
        assert f"  {bench.resolve() / name}" in printed
    for run in finished:
        assert f"  {bench / run / 'viewer'}/  (neuron viewer: open index.html)" in printed
        assert f"  {bench / run / 'openai'}/  (1 neurons in OpenAI's format)" in printed
    assert "[neurons](0/viewer/index.html)" in (bench / "report.md").read_text()
    assert 'href="0/viewer/index.html"' in (bench / "report.html").read_text()
