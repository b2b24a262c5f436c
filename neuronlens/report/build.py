"""A report from a run or multirun directory: load the runs, join shards, make the results, and
lay out every section."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
from importlib import metadata
from pathlib import Path

import yaml

from neuronlens.report import pairs as pairing
from neuronlens.report import plots, sections
from neuronlens.report.content import Link, Report, Section
from neuronlens.report.results import results_of
from neuronlens.report.runs import Run, join_shards
from neuronlens.errors import UserError


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def machine_line() -> str:
    """The machine the report was made on, in one sentence (cf. benchmarks/common.py)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"Machine: {cpu}, {os.cpu_count()} cores ({usable} usable), Python {platform.python_version()}, "
            f"torch {version('torch')}, transformers {version('transformers')}.")


def _command(overrides: dict, multirun: bool) -> str:
    task = [str(o) for o in overrides.get("task") or []]
    extra = [str(o) for o in overrides.get("hydra") or [] if not str(o).startswith("hydra.mode=")]
    return " ".join(["neuronlens"] + (["-m"] if multirun else []) + [shlex.quote(o) for o in task + extra])


def commands(root: Path, runs: list[Run]) -> list[str]:
    """The commands that made the runs: each multirun's from its multirun.yaml, then each run not
    inside a multirun from its .hydra/hydra.yaml."""
    out, covered = [], []
    for path in sorted(root.rglob("multirun.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        out.append(_command(((cfg.get("hydra") or {}).get("overrides") or {}), multirun=True))
        covered.append(path.parent)
    for run in runs:
        hydra_file = run.path / ".hydra" / "hydra.yaml"
        if any(run.path.is_relative_to(c) for c in covered) or not hydra_file.exists():
            continue
        cfg = yaml.safe_load(hydra_file.read_text()) or {}
        out.append(_command(((cfg.get("hydra") or {}).get("overrides") or {}), multirun=False))
    return list(dict.fromkeys(out))


def viewer_links(runs: list[Run], out_dir: Path) -> dict[str, Link]:
    links = {}
    for run in runs:
        index = run.path / "viewer" / "index.html"
        if index.exists():
            links[str(run.path)] = Link("neurons", os.path.relpath(index, out_dir))
    return links


def build(root: Path, runs: list[Run], out_dir: Path) -> Report:
    experiments = join_shards(runs)
    if not experiments:
        raise UserError(f"{root} holds no finished run (no summary.json); {len(runs)} unfinished run(s) found.")
    results, notes = results_of(experiments, runs)
    warnings = [w for e in experiments for w in e.warnings] + notes
    warnings += [f"{os.path.relpath(r.path, out_dir)} is unfinished (no summary.json): left out of the results."
                 for r in runs if not r.finished]
    viewers = viewer_links(runs, out_dir)
    labels = {str(run.path): r.label for r in results if r.judge_name is None for run in r.experiment.runs}
    pairs = pairing.one_factor_pairs(results)
    body = [sections.method()]
    if warnings:
        body.append(Section("Warnings", [warnings]))
    body += [sections.results_section(results, viewers), sections.judge_power_section(results)]
    body += [s for s in (sections.baseline_section(results, pairs), sections.synthetic_section(results, pairs))
             if s is not None]
    body += [sections.paired_section(results, pairs), sections.unpairable_section(results, pairs),
             sections.agreement_section(results)]
    body.append(Section("Plots", [plots.means(results), plots.by_layer(results), plots.histograms(results)]))
    body.append(sections.runs_section(runs, out_dir, labels, viewers))
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = [f"{len(runs)} run(s) under `{root}`; {len(results)} result(s). Made {now} by neuronlens "
              f"{version('neuronlens')}.", machine_line()]
    return Report("neuronlens benchmark report", header, commands(root, runs), body)
