"""Run directories on disk: finding them, loading them, joining the shards of one experiment, and
writing merged run directories (``neuronlens-report DIR --merge OUT``).

A run directory holds ``neurons.jsonl`` (one row per neuron) and, once finished, ``summary.json``;
Hydra adds ``.hydra/{config,overrides}.yaml``. Runs with the same ``experiment`` hash and different
``shard`` are parts of one experiment.
"""

from __future__ import annotations

import json
from collections import Counter
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neuronlens.errors import UserError
from neuronlens.files import read_rows, write_atomic, write_json
from neuronlens.summary import summarise_rows

SHARD_KEYS = ("neurons.shard", "neurons.n_shards")


@dataclass
class Run:
    path: Path
    summary: dict[str, Any] | None  # None: unfinished (no summary.json yet)
    rows: list[dict[str, Any]]
    setup: dict[str, Any] | None  # experiment.json
    overrides: list[str]  # Hydra task overrides, as typed

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def experiment(self) -> str:
        return (self.summary or {}).get("experiment") or f"dir:{self.path}"

    @property
    def shard(self) -> tuple[int, int] | None:
        s = (self.summary or {}).get("shard")
        return None if s is None else (int(s[0]), int(s[1]))

    @property
    def choices(self) -> dict[str, str]:
        return (self.summary or {}).get("choices") or {}


@dataclass
class Experiment:
    """One experiment: its shards joined, rows de-duplicated by (layer, index)."""

    runs: list[Run]
    rows: dict[tuple[int, int], dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def id(self) -> str:
        return self.first.experiment

    def total(self, key: str) -> float:
        return sum((r.summary or {}).get(key) or 0 for r in self.runs)

    def remote_cost(self, role: str) -> tuple[bool, float | None]:
        """(whether ``role`` used a remote backend, its dollars summed over shards or None when
        unknown)."""
        stats = [((r.summary or {}).get("remote") or {}).get(role) for r in self.runs]
        used = [s for s in stats if s]
        if not used:
            return False, None
        if any(s.get("cost_usd") is None for s in used):
            return True, None
        return True, float(sum(s["cost_usd"] for s in used))


def find_runs(root: Path) -> list[Path]:
    """Every directory under ``root`` (itself included) holding summary.json or neurons.jsonl."""
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; give a run or multirun directory.")
    found = {p.parent for name in ("summary.json", "neurons.jsonl") for p in root.rglob(name)}
    return sorted(found, key=_natural)


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in path.parts]


def rows_of_run(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run directory's neurons.jsonl, with a clear error when it has none."""
    path = Path(run_dir) / "neurons.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no neurons.jsonl; give the directory of a neuronlens run.")
    return read_rows(path)


def load_run(path: Path) -> Run:
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else None
    setup = json.loads((path / "experiment.json").read_text()) if (path / "experiment.json").exists() else None
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in yaml.safe_load(overrides_file.read_text()) or []] if overrides_file.exists() else []
    return Run(path, summary, read_rows(path / "neurons.jsonl"), setup, overrides)


def load_runs(root: Path) -> list[Run]:
    paths = find_runs(root)
    if not paths:
        raise UserError(f"{root} holds no run: no summary.json or neurons.jsonl anywhere under it.")
    return [load_run(p) for p in paths]


def join_shards(runs: list[Run]) -> list[Experiment]:
    """Finished runs grouped by experiment hash; missing or repeated shards and neurons found in
    more than one run are warned about, and each neuron is kept once."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.finished:
            groups.setdefault(run.experiment, []).append(run)
    experiments = []
    for exp_id, members in groups.items():
        warnings = []
        shards = [r.shard for r in members]
        if len(members) > 1 or any(s is not None for s in shards):
            if any(s is None for s in shards):
                warnings.append(f"experiment {exp_id}: {len(members)} runs of the same experiment, "
                                "not all of them shards; their neurons are merged.")
            counts = {s[1] for s in shards if s is not None}
            seen = [s[0] for s in shards if s is not None]
            for count in counts:
                missing = sorted(set(range(count)) - set(seen))
                if missing:
                    warnings.append(f"experiment {exp_id}: shard(s) {missing} of {count} missing; "
                                    "its numbers cover only the shards present.")
            repeated = sorted({i for i in seen if seen.count(i) > 1})
            if repeated:
                warnings.append(f"experiment {exp_id}: shard(s) {repeated} present more than once.")
        rows: dict[tuple[int, int], dict] = {}
        duplicates = 0
        for run in members:
            for row in run.rows:
                key = (int(row["layer"]), int(row["index"]))
                if key in rows:
                    duplicates += 1
                    continue
                rows[key] = row
        if duplicates:
            warnings.append(f"experiment {exp_id}: {duplicates} neuron(s) found in more than one run; "
                            "the first copy is kept.")
        experiments.append(Experiment(members, dict(sorted(rows.items())), warnings))
    return experiments


def merged_summary(exp: Experiment) -> dict[str, Any]:
    """summary.json recomputed from an experiment's merged rows."""
    rows = list(exp.rows.values())
    first = exp.first.summary or {}
    remote: dict[str, Any] = {}
    for role in ("explainer", "simulator"):
        stats = [((r.summary or {}).get("remote") or {}).get(role) for r in exp.runs]
        stats = [s for s in stats if s]
        if not stats:
            remote[role] = None
            continue
        merged = {k: sum(s.get(k) or 0 for s in stats) for k, v in stats[0].items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "cost_usd"}
        merged["failures"] = dict(sum((Counter(s.get("failures") or {}) for s in stats), Counter()))
        merged["cost_usd"] = (None if any(s.get("cost_usd") is None for s in stats)
                              else sum(s["cost_usd"] for s in stats))
        remote[role] = merged
    return summarise_rows(rows) | {
        "wall_seconds": exp.total("wall_seconds"),
        "subject": first.get("subject"),
        "explainer": first.get("explainer"),
        "simulator": first.get("simulator"),
        "choices": first.get("choices") or {},
        "experiment": first.get("experiment"),
        "shard": None,
        "remote": remote,
        "merged_from": [str(r.path) for r in exp.runs],
    }


def merge(root: Path, out: Path) -> list[tuple[Experiment, Path]]:
    """Write one run directory per experiment under ``out`` (named by its experiment hash):
    neurons.jsonl joined and de-duplicated, summary.json recomputed, the first shard's
    experiment.json and .hydra (without the shard overrides)."""
    written = []
    for exp in join_shards(load_runs(root)):
        target = out / exp.id.replace("dir:", "").replace("/", "_").strip("_")
        if target.exists() and (target / "neurons.jsonl").exists():
            raise UserError(f"{target} already exists; choose an empty --merge folder.")
        target.mkdir(parents=True, exist_ok=True)
        with open(target / "neurons.jsonl", "w") as f:
            for row in exp.rows.values():
                f.write(json.dumps(row) + "\n")
        write_json(target / "summary.json", merged_summary(exp))
        src = exp.first.path
        if (src / "experiment.json").exists():
            shutil.copy(src / "experiment.json", target / "experiment.json")
        if (src / ".hydra").is_dir():
            shutil.copytree(src / ".hydra", target / ".hydra", dirs_exist_ok=True)
            kept = [o for o in exp.first.overrides if o.split("=", 1)[0].lstrip("+~") not in SHARD_KEYS]
            write_atomic(target / ".hydra" / "overrides.yaml", yaml.safe_dump(kept))
        written.append((exp, target))
    return written
