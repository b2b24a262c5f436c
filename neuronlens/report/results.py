"""Results: one (subject, explainer, judge) triple each, with a score per neuron in the judge's
metric.

Each experiment gives one result for its main simulator and one per judge found in its rows'
``judges``. A result is named from the run's config-group choices and model names
(``explainer=local(SmolLM2-135M-Instruct (embedded))``, ``judge=similarity``) plus the overrides that vary between the
runs of the report (``explain.max_tokens=8``). Results are grouped by what they were measured on
(subject, corpus, recording, split): only results of one group may be paired.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from neuronlens.report.runs import SHARD_KEYS, Experiment, Run
from neuronlens.summary import CONSTANT, CORRELATION, LOW_MASS, summarise_rows

BASELINES = ("top_tokens", "shuffled", "shuffled_truth")
TRUTH = "truth"
GROUPS = ("subject", "corpus", "explainer", "simulator")


@dataclass(frozen=True)
class Neuron:
    layer: int
    index: int
    score: float | None
    explanation: str | None
    excerpts: str | None  # hash of the test excerpts' kinds and tokens
    flag: str | None = None      # "constant simulation" (scored 0), ...
    mass: float | None = None    # mean digit mass over the test tokens


@dataclass
class Result:
    subject: str  # e.g. "smollm2(SmolLM2-135M-Instruct (embedded)) corpus=builtin"
    explainer: str
    judge: str
    setting: str  # overrides that vary between runs and belong to no role ("seed=1"), or ""
    group: str  # what it was measured on: results pair only within a group
    experiment: Experiment
    judge_name: str | None  # None: the run's main simulator
    neurons: dict[tuple[int, int], Neuron]
    explainer_choice: str
    subject_choice: str
    failed_excerpts: int | None
    tokens: int | None
    cost_usd: float | None
    remote: bool
    metric: str = CORRELATION  # what the judge's scores are (its declared metric)
    label: str = ""
    viewers: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.explainer_choice in BASELINES:
            return "baseline"
        return "truth" if self.explainer_choice == TRUTH else "explainer"

    @property
    def synthetic(self) -> bool:
        return self.subject_choice == "synthetic"

    def scores(self) -> list[float]:
        return [n.score for n in self.neurons.values() if n.score is not None]

    @property
    def n_failed(self) -> int:
        return sum(1 for n in self.neurons.values() if n.score is None)

    @property
    def n_constant(self) -> int:
        return sum(1 for n in self.neurons.values() if n.flag == CONSTANT)

    @property
    def n_low_mass(self) -> int | None:
        """Neurons whose digit mass is below LOW_MASS (None when this judge records no mass)."""
        masses = [n.mass for n in self.neurons.values() if n.mass is not None]
        return sum(1 for m in masses if m < LOW_MASS) if masses else None

    @property
    def failed_explanations(self) -> int:
        return sum((r.get("failures") or {}).get("explanations", 0) for r in self.experiment.rows.values())

    @property
    def wall_seconds(self) -> float:
        return self.experiment.total("wall_seconds")

    def factors(self) -> tuple[str, str, str]:
        return self.explainer, self.judge, self.setting


def short_model(model: Any) -> str | None:
    """A model name as a label shows it: a path by its last part, anything else as is."""
    if not model:
        return None
    text = str(model).rstrip("/")
    return text.rsplit("/", 1)[-1] if text.startswith(("/", ".", "~")) else text


def named(choice: str | None, model: Any) -> str:
    model = short_model(model)
    if choice and model and model != choice:
        return f"{choice}({model})"
    return choice or model or "?"


def excerpt_hash(row: dict[str, Any], simulated: list | None = None) -> str | None:
    """A hash of the test excerpts a score was computed on (with ``simulated``, a judge's
    per-excerpt simulations: only the excerpts it did not fail)."""
    excerpts = row.get("test_excerpts")
    if simulated is not None and excerpts and len(simulated) == len(excerpts):
        excerpts = [e for e, s in zip(excerpts, simulated) if s is not None]
    if not excerpts:
        return None
    text = json.dumps([[e.get("kind"), e.get("tokens")] for e in excerpts], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _parse(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def varying_overrides(runs: list[Run]) -> dict[str, dict[str, str]]:
    """Per run path, the overrides whose value is not the same in every finished run (shards and
    group choices left out: the labels show those already)."""
    parsed = {str(r.path): dict(_parse(o) for o in r.overrides) for r in runs if r.finished}
    keys = {k for d in parsed.values() for k in d}
    varying = {k for k in keys if len({d.get(k) for d in parsed.values()}) > 1}
    skip = set(SHARD_KEYS) | set(GROUPS) | {"experiment"}  # a preset: its settings show already
    shown = lambda k: (k in varying and k not in skip and "@" not in k and not k.startswith("hydra")  # noqa: E731
                       and not (k.endswith(".model") and _role_of(k) != "setting"))  # names show models
    return {path: {k: v for k, v in d.items() if shown(k)} for path, d in parsed.items()}


def _role_of(key: str) -> str:
    head = key.split(".", 1)[0]
    return {"subject": "subject", "corpus": "subject", "recording": "subject", "explainer": "explainer",
            "explain": "explainer", "simulator": "simulator", "simulation": "simulator",
            "judges": "judges"}.get(head, "setting")


def _group_key(run: Run) -> str:
    setup = run.setup or {}
    if setup:
        subject = {k: v for k, v in (setup.get("subject") or {}).items() if k != "device"}
        basis = {"subject": subject, "corpus": setup.get("corpus"), "recording": setup.get("recording"),
                 "split": (setup.get("scoring") or {}).get("split_seed")}
    else:
        basis = {"subject": (run.summary or {}).get("subject"), "corpus": run.choices.get("corpus")}
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:8]


def results_of(experiments: list[Experiment], runs: list[Run]) -> tuple[list[Result], list[str]]:
    """Every (subject, explainer, judge) result of the report, labelled, in a stable order, and
    notes on the results left out as repeats."""
    varying = varying_overrides(runs)
    out = []
    for exp in experiments:
        run, summary = exp.first, exp.first.summary or {}
        ch = run.choices
        extra = varying.get(str(run.path), {})
        by_role: dict[str, list[str]] = {}
        for k, v in sorted(extra.items()):
            by_role.setdefault(_role_of(k), []).append(f"{k}={v}")
        join = lambda base, role: " ".join([base, *by_role.get(role, [])])  # noqa: E731
        subject = join(f"{named(ch.get('subject'), summary.get('subject'))}"
                       + (f" corpus={ch['corpus']}" if ch.get("corpus") else ""), "subject")
        explainer = join(named(ch.get("explainer"), summary.get("explainer")), "explainer")
        setting = " ".join(by_role.get("setting", []))
        group = _group_key(run)
        exp_cost = exp.remote_cost("explainer")
        sim_cost = exp.remote_cost("simulator")
        rows = exp.rows.values()
        counted = summarise_rows(list(rows))   # the metric of each judge
        common = dict(subject=subject, explainer=explainer, setting=setting, group=group, experiment=exp,
                      explainer_choice=ch.get("explainer") or "", subject_choice=ch.get("subject") or "")
        main = {k: Neuron(k[0], k[1], r.get("score"), r.get("explanation"), excerpt_hash(r),
                          r.get("score_flag"), (r.get("mass") or {}).get("mean"))
                for k, r in exp.rows.items()}
        tokens = sum(sum((r.get("usage") or {}).get(role) or [0, 0]) for r in rows
                     for role in ("explainer", "simulator"))
        out.append(Result(**common, judge=join(named(ch.get("simulator"), summary.get("simulator")), "simulator"),
                          judge_name=None, neurons=main, failed_excerpts=exp.total("n_failed_excerpts"),
                          tokens=tokens, metric=counted["metric"], **_cost(exp_cost, sim_cost)))
        names = sorted({name for r in rows for name in (r.get("judges") or {})})
        for name in names:
            setup_judge = ((run.setup or {}).get("judges") or {}).get(name) or {}
            judge = join(named(ch.get(f"simulator@judges.{name}", name),
                               setup_judge.get("model") if isinstance(setup_judge, dict) else None), "judges")
            neurons, failed, judge_tokens = {}, [], 0
            for k, r in exp.rows.items():
                entry = (r.get("judges") or {}).get(name) or {}
                neurons[k] = Neuron(k[0], k[1], entry.get("score"), r.get("explanation"),
                                    excerpt_hash(r, entry.get("test_simulated", entry.get("test_predictions"))),
                                    entry.get("score_flag"), (entry.get("mass") or {}).get("mean"))
                if "failed_excerpts" in entry:
                    failed.append(entry["failed_excerpts"] or 0)
                judge_tokens += sum(entry.get("usage") or [0, 0])
            expl_tokens = sum(sum((r.get("usage") or {}).get("explainer") or [0, 0]) for r in rows)
            out.append(Result(**common, judge=judge, judge_name=name, neurons=neurons,
                              failed_excerpts=sum(failed) if failed else None, tokens=expl_tokens + judge_tokens,
                              metric=counted["judges"][name]["metric"],
                              **_cost(exp_cost, exp.remote_cost(f"judge:{name}"))))
    out.sort(key=lambda r: (r.subject, r.group, r.kind != "truth", r.kind == "baseline", r.explainer,
                            r.setting, r.judge))
    out, notes = drop_repeats(out)
    _label(out)
    return out, notes


def drop_repeats(results: list[Result]) -> tuple[list[Result], list[str]]:
    """Drop a result that repeats another's factors with the same scores (e.g. the same judge on the
    same explanations in two runs that differ only in their main simulator)."""
    kept: list[Result] = []
    notes = []
    for r in results:
        twin = next((k for k in kept if (k.group, k.subject, k.explainer, k.judge, k.setting)
                     == (r.group, r.subject, r.explainer, r.judge, r.setting)), None)
        if twin is not None and {k: n.score for k, n in twin.neurons.items()} == {
                k: n.score for k, n in r.neurons.items()}:
            notes.append(f"judge={r.judge} in {r.experiment.first.path} gives the same scores as in "
                         f"{twin.experiment.first.path}; shown once.")
            continue
        kept.append(r)
    return kept, notes


def _cost(*roles: tuple[bool, float | None]) -> dict[str, Any]:
    remote = any(used for used, _ in roles)
    known = all(cost is not None for used, cost in roles if used)
    total = sum(cost for used, cost in roles if used and cost is not None)
    return {"remote": remote, "cost_usd": total if remote and known else None}


def _label(results: list[Result]) -> None:
    """Labels that name every factor; a label given twice gets ``#2``, ``#3``..."""
    seen: Counter = Counter()
    for r in results:
        parts = [f"subject={r.subject}", f"explainer={r.explainer}", f"judge={r.judge}"]
        label = " ".join(parts + ([r.setting] if r.setting else []))
        seen[label] += 1
        r.label = label if seen[label] == 1 else f"{label} #{seen[label]}"
