"""Judge power: can each judge of a run tell a true explanation from a shuffled one?

Every run scores a few control neurons whose explanations are known (the rule neurons of
``neuronlens/conf/subject/synthetic.yaml``, recorded on the built-in corpus) with each judge: once with the
true explanation and once with another control's (a fixed rotation). A judge whose scores do not
separate the two cannot rank explanations, and its scores of the run's real neurons are noise.

Reported per judge: the paired difference (true minus shuffled) with its bootstrap 95% interval,
and the AUC of true against shuffled scores (0.5: no separation), with the judge's digit mass on
the controls (a simulator that puts little probability on "0".."10" is close to guessing). The
verdict follows the interval: it must lie above 0 for the judge to count as telling them apart. No judge's settings
were chosen on these rules (the similarity judge's were chosen on other word families,
``benchmarks/similarity_judge.py``), so the verdict is a fair test.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from neuronlens.conf import CONF_DIR
from neuronlens.records import NeuronId, NeuronRecord
from neuronlens.stats import paired
from neuronlens.scorers.correlation import correlate
from neuronlens.summary import headline, mass_stats

log = logging.getLogger(__name__)
RULES = CONF_DIR / "subject" / "synthetic.yaml"


def control_neurons(settings: DictConfig, directory: Path) -> list[tuple[NeuronRecord, str]]:
    """The control neurons with their true explanations (recorded once into ``directory``)."""
    from neuronlens.subject.synthetic import SyntheticSubject

    subject = SyntheticSubject(OmegaConf.load(RULES).neurons)
    cfg = OmegaConf.create({
        "corpus": {"_target_": "neuronlens.corpus.BuiltinCorpus"}, "seed": 0,
        "recording": {"top_k": settings.top_k, "n_random": settings.n_random, "batch_size": 32,
                      "window": settings.window, "max_windows": settings.max_windows}})
    neurons = [NeuronId(0, i) for i in range(len(subject.rules))]
    records = subject.records(cfg, neurons, directory)
    return [(r, subject.explanation(r.neuron_id)) for r in records]


def auc(a: list[float], b: list[float]) -> float | None:
    """P(a score of ``a`` > one of ``b``), ties counting half (the Mann-Whitney AUC)."""
    if not a or not b:
        return None
    x, y = np.asarray(a)[:, None], np.asarray(b)[None, :]
    return float(np.mean((x > y) + 0.5 * (x == y)))


def power(judge, controls: list[tuple[NeuronRecord, str]]) -> dict[str, Any]:
    """One judge's scores of the controls with true and shuffled explanations, and their verdict."""
    explanations = [e for _, e in controls]
    true, shuffled, masses = [], [], []
    for i, (neuron, explanation) in enumerate(controls):
        other = explanations[(i + 1) % len(explanations)]
        excerpts = neuron.most_positive_activation_records + neuron.random_sample
        pair = []
        for text in (explanation, other):
            sim = judge.simulate(text, excerpts)
            masses.extend({"mass": m} for m in sim.mass if m)
            kept = [(r.activations, list(e)) for r, e in zip(excerpts, sim.expected) if e is not None]
            pair.append(headline(correlate([a for a, _ in kept], [e for _, e in kept]).to_json())
                        if kept else None)
        if None not in pair:
            true.append(pair[0])
            shuffled.append(pair[1])
    diff = paired(true, shuffled)
    ci = None if diff.ci is None else [round(diff.ci.low, 4), round(diff.ci.high, 4)]
    tells = ci is not None and ci[0] > 0
    return {"n": diff.n, "mean_true": _mean(true), "mean_shuffled": _mean(shuffled),
            "difference": None if diff.mean_diff is None else round(diff.mean_diff, 4),
            "difference_ci": ci, "auc": auc(true, shuffled), "tells_apart": tells,
            "mass": mass_stats(masses)}


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def verdict(name: str, p: dict[str, Any]) -> str:
    """One line saying whether judge ``name`` can tell true from shuffled explanations."""
    ci = p["difference_ci"]
    figures = (f"true {p['mean_true']} vs shuffled {p['mean_shuffled']} on {p['n']} control "
               f"neurons, difference {p['difference']} "
               f"[{'—' if ci is None else f'{ci[0]}, {ci[1]}'}], AUC {p['auc']}")
    if p["tells_apart"]:
        return f"{name}: tells true from shuffled explanations ({figures})"
    return (f"{name}: cannot tell true from shuffled explanations ({figures}) — treat its scores "
            "as noise")


def judge_power(judges: dict[str, Any], settings: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``judge_power`` for ``summary.json``: each judge's power on the control neurons."""
    controls = control_neurons(settings, run_dir / "controls")
    out = {}
    for name, judge in judges.items():
        start = time.perf_counter()
        out[name] = power(judge, controls) | {"seconds": round(time.perf_counter() - start, 2)}
    return out
