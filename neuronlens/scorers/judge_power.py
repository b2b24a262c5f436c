"""Judge power: can each judge of a run tell a true explanation from a shuffled one?

Every run scores a few control neurons whose explanations are known (the rule neurons of
``conf/subject/synthetic.yaml``, recorded on the built-in corpus by
``subject.synthetic.control_neurons``) with each judge: once with the
true explanation and once with another control's (a fixed rotation). A judge whose scores do not
separate the two cannot rank explanations, and its scores of the run's real neurons are noise.

Each judge scores as it scores the run's neurons (``Scorer.score``), in its own declared metric.
Reported per judge: the paired difference (true minus shuffled) with its bootstrap 95% interval,
and the AUC of true against shuffled scores (0.5: no separation), with the judge's digit mass on
the controls (a simulator that puts little probability on "0".."10" is close to guessing). The
verdict follows the interval: it must lie on the metric's better side of 0 for the judge to count
as telling them apart. No judge's settings were chosen on these rules (the similarity judge's
were chosen on other word families, ``benchmarks/similarity_judge.py``), so the verdict is a fair
test.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from neuronlens.records import NeuronRecord
from neuronlens.scorers.base import Scorer
from neuronlens.stats import paired
from neuronlens.summary import CORRELATION, mass_stats

log = logging.getLogger(__name__)


def auc(a: list[float], b: list[float]) -> float | None:
    """P(a score of ``a`` > one of ``b``), ties counting half (the Mann-Whitney AUC); ``a``: the
    scores that should be higher."""
    if not a or not b:
        return None
    x, y = np.asarray(a)[:, None], np.asarray(b)[None, :]
    return float(np.mean((x > y) + 0.5 * (x == y)))


def power(judge: Scorer, controls: list[tuple[NeuronRecord, str]]) -> dict[str, Any]:
    """One judge's scores of the controls with true and shuffled explanations, in its metric,
    and their verdict."""
    explanations = [e for _, e in controls]
    metric = judge.metric
    true, shuffled, masses = [], [], []
    for i, (neuron, explanation) in enumerate(controls):
        other = explanations[(i + 1) % len(explanations)]
        pair = []
        for text in (explanation, other):
            scored = judge.score(text, neuron.most_positive_activation_records, neuron.random_sample)
            masses.extend({"mass": m} for m in scored.result.mass if m)
            pair.append(scored.value())
        if None not in pair:
            true.append(pair[0])
            shuffled.append(pair[1])
    diff = paired(true, shuffled)
    ci = None if diff.ci is None else [round(diff.ci.low, 4), round(diff.ci.high, 4)]
    up = metric.higher_is_better   # the true explanation must score better than a shuffled one
    tells = ci is not None and (ci[0] > 0 if up else ci[1] < 0)
    return {"metric": metric.name, "n": diff.n, "mean_true": _mean(true),
            "mean_shuffled": _mean(shuffled),
            "difference": None if diff.mean_diff is None else round(diff.mean_diff, 4),
            "difference_ci": ci, "auc": auc(true, shuffled) if up else auc(shuffled, true),
            "tells_apart": tells, "mass": mass_stats(masses)}


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def verdict(name: str, p: dict[str, Any]) -> str:
    """One line saying whether judge ``name`` can tell true from shuffled explanations."""
    ci = p["difference_ci"]
    figures = (f"mean {p.get('metric', CORRELATION)}: true {p['mean_true']} vs shuffled "
               f"{p['mean_shuffled']} on {p['n']} control neurons, difference {p['difference']} "
               f"[{'—' if ci is None else f'{ci[0]}, {ci[1]}'}], AUC {p['auc']}")
    if p["tells_apart"]:
        return f"{name}: tells true from shuffled explanations ({figures})"
    return (f"{name}: cannot tell true from shuffled explanations ({figures}) — treat its scores "
            "as noise")


def judge_power(judges: dict[str, Scorer], controls: list[tuple[NeuronRecord, str]]) -> dict[str, Any]:
    """``judge_power`` for ``summary.json``: each judge's power on the control neurons (with their
    true explanations: ``subject.synthetic.control_neurons``)."""
    out = {}
    for name, judge in judges.items():
        start = time.perf_counter()
        out[name] = power(judge, controls) | {"seconds": round(time.perf_counter() - start, 2)}
    return out
