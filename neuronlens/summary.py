"""A run's numbers from its rows: one place for the rules, used by the run's ``summary.json`` and
by the report when it merges shards.

The headline mean counts every neuron that was simulated: a constant simulation (the simulator
predicted the same value everywhere, so correlation is undefined) scores 0 there and keeps its
flag. The mean over defined scores alone is given beside it, with the counts of scored, constant
and failed neurons, so that neither can hide the other.

Every score is its judge's declared metric (``scorers.base.Metric``), named by the ``metric`` of
its row or judge entry; rows written before judges declared one are correlations.

Digit mass: the probability the simulator put on "0".."10" at a placeholder before renormalising.
Where it is small, the simulator mostly wanted to say something else, and the renormalised
expected value is close to a guess (see `LOW_MASS`).
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

CONSTANT = "constant simulation"
CORRELATION = "correlation"   # the simulators' metric, and that of rows without a ``metric``
# Below this mean mass on the digits over an explanation's test tokens, at least 95% of the
# simulator's probability went to answers outside the asked format: the score is flagged.
LOW_MASS = 0.05


def headline(score: dict | None, metric: str = CORRELATION) -> float | None:
    """The number a neuron contributes to the headline mean, from one split's scores: the value of
    ``metric``, 0 for a constant simulation, None when undefined for another reason (no tokens,
    constant true activations). Every reader of a score reads it here."""
    if not score:
        return None
    if score.get(metric) is None and score.get("flag") == CONSTANT:
        return 0.0
    return score.get(metric)


def metric_of(entry: dict) -> str:
    """The metric of a row's or a judge entry's ``score`` (rows from before judges declared their
    metric are correlations)."""
    return entry.get("metric") or CORRELATION


def mass_stats(excerpts: list[dict], key: str = "mass") -> dict[str, float] | None:
    """Mean and minimum digit mass over the tokens of scored excerpts (None without any)."""
    values = [m for e in excerpts for m in (e.get(key) or ()) if m is not None]
    if not values:
        return None
    return {"mean": round(sum(values) / len(values), 4), "min": round(min(values), 4)}


def judge_rows(rows: list[dict], name: str | None) -> list[dict]:
    """What ``name`` (None: the main simulator) made of each row: its score, metric, flag and mass."""
    out = []
    for r in rows:
        if name is None:
            out.append({"score": r.get("score"), "metric": metric_of(r), "flag": r.get("score_flag"),
                        "mass": r.get("mass"), "failed": bool(r.get("error"))})
        elif name in (r.get("judges") or {}):
            j = r["judges"][name]
            out.append({"score": j.get("score"), "metric": metric_of(j), "flag": j.get("score_flag"),
                        "mass": j.get("mass"), "failed": False})
    return out


def scores_summary(judged: list[dict]) -> dict[str, Any]:
    """Headline mean, mean over defined scores, counts and digit mass of one judge's rows, and the
    metric they are."""
    scored = [j["score"] for j in judged if j["score"] is not None]
    defined = [j["score"] for j in judged if j["score"] is not None and j["flag"] != CONSTANT]
    means = [j["mass"]["mean"] for j in judged if j.get("mass")]
    return {
        "metric": judged[0]["metric"] if judged else CORRELATION,
        "mean_score": sum(scored) / len(scored) if scored else None,
        "mean_defined_score": sum(defined) / len(defined) if defined else None,
        "n": len(scored),
        "n_constant": sum(1 for j in judged if j["flag"] == CONSTANT),
        "n_failed": sum(1 for j in judged if j["failed"]),
        "n_undefined": sum(1 for j in judged if j["score"] is None and not j["failed"]),
        "mass": None if not means else {
            "median_of_means": round(statistics.median(means), 4),
            "min": min(j["mass"]["min"] for j in judged if j.get("mass")),
            "n_low": sum(1 for m in means if m < LOW_MASS)},
    }


def summarise_rows(rows: list[dict]) -> dict[str, Any]:
    """The counts and means of a run's rows (the parts of ``summary.json`` that rows decide)."""
    main = scores_summary(judge_rows(rows, None))
    names = list(dict.fromkeys(name for r in rows for name in r.get("judges") or {}))
    failures: Counter[str] = Counter()
    for r in rows:
        failures.update((r.get("failures") or {}).get("by_kind") or {})
    return {
        "n_neurons": len(rows),
        "n_failed": main["n_failed"],
        "n_scored": main["n"],
        "n_constant": main["n_constant"],
        "n_undefined": main["n_undefined"],
        "metric": main["metric"],
        "mean_score": main["mean_score"],
        "mean_defined_score": main["mean_defined_score"],
        "mass": main["mass"],
        "judges": {name: scores_summary(judge_rows(rows, name)) for name in names},
        "n_failed_excerpts": sum((r.get("failures") or {}).get("excerpts", 0) for r in rows),
        "failures_by_kind": dict(failures.most_common()),
        "n_failed_explanations": sum((r.get("failures") or {}).get("explanations", 0) for r in rows),
        "n_copied": sum(1 for r in rows if r.get("explanation_flag")),
        "n_copies_replaced": sum(r.get("copies_replaced") or 0 for r in rows),
        "revisions": {"n": sum(len(r.get("revisions") or ()) for r in rows),   # explain.revisions
                      "won": sum(1 for r in rows for v in r.get("revisions") or () if v.get("won")),
                      "unchanged": sum(1 for r in rows for v in r.get("revisions") or () if v.get("unchanged"))},
        "tokens": {role: {kind: sum(((r.get("usage") or {}).get(role) or [0, 0])[i] for r in rows)
                          for i, kind in enumerate(("prompt", "completion"))}
                   for role in ("explainer", "simulator")},
    }
