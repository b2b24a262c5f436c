"""Which results may be compared neuron by neuron, and on which neurons.

Two results pair only within one group (same subject, corpus, recording and split), on the neurons
both scored whose test excerpts are identical (their tokens hashed). Shown pairs differ in exactly
one factor — the explainer, the judge, or another setting — so that every difference has one cause,
and have one metric (a correlation minus an accuracy means nothing; their ranks still agree or not).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from neuronlens import stats
from neuronlens.report.results import Result


@dataclass
class Pair:
    a: Result
    b: Result
    factor: str  # "explainer" | "judge" | "setting"
    keys: list[tuple[int, int]]  # neurons paired
    failed: int  # neurons in both, failed in either
    mismatched: int  # neurons in both whose test excerpts differ (or explanations, for agreement)
    only_one: int  # neurons in only one of the two
    unsaved: int = 0  # neurons in both without saved test excerpts (nothing to check the pairing on)

    @property
    def a_scores(self) -> list[float]:
        return [self.a.neurons[k].score for k in self.keys]

    @property
    def b_scores(self) -> list[float]:
        return [self.b.neurons[k].score for k in self.keys]

    def test(self) -> stats.Paired:
        return stats.paired(self.a_scores, self.b_scores)

    def excluded(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.failed, "failed"), (self.mismatched, "other excerpts"),
                                               (self.unsaved, "no saved excerpts"), (self.only_one, "in one only"))
                 if n]
        return ", ".join(parts) or "none"


def match(a: Result, b: Result, factor: str, *, same_text: bool = False) -> Pair:
    """The neurons on which ``a`` and ``b`` can be compared (and, with ``same_text``, where both
    scored the very same explanation)."""
    both = sorted(set(a.neurons) & set(b.neurons))
    keys, failed, mismatched, unsaved = [], 0, 0, 0
    for k in both:
        x, y = a.neurons[k], b.neurons[k]
        if x.score is None or y.score is None:
            failed += 1
        elif x.excerpts is None or y.excerpts is None:
            unsaved += 1
        elif x.excerpts != y.excerpts or (same_text and x.explanation != y.explanation):
            mismatched += 1
        else:
            keys.append(k)
    only = len(set(a.neurons) ^ set(b.neurons))
    return Pair(a, b, factor, keys, failed, mismatched, only, unsaved)


def differing(a: Result, b: Result) -> list[str]:
    return [name for name, x, y in zip(("explainer", "judge", "setting"), a.factors(), b.factors()) if x != y]


def _ordered(a: Result, b: Result) -> tuple[Result, Result]:
    """Explainers before baselines before the truth: differences read 'explainer minus baseline'."""
    rank = {"explainer": 0, "baseline": 1, "truth": 2}
    return (b, a) if rank[b.kind] < rank[a.kind] else (a, b)


def groups(results: list[Result]) -> dict[str, list[Result]]:
    out: dict[str, list[Result]] = {}
    for r in results:
        out.setdefault(r.group, []).append(r)
    return out


def one_factor_pairs(results: list[Result]) -> list[Pair]:
    """Every pair in one group that differs in exactly one factor and has one metric (some may have
    no neuron)."""
    pairs = []
    for members in groups(results).values():
        for a, b in combinations(members, 2):
            diff = differing(a, b)
            if len(diff) == 1 and a.metric == b.metric:
                a, b = _ordered(a, b)
                pairs.append(match(a, b, diff[0]))
    return pairs


def agreement_pairs(results: list[Result]) -> list[Pair]:
    """Results with the same explainer and setting scored by different judges, on the neurons
    where the explanation text is the same (the same run, or deterministic reruns)."""
    return [match(a, b, "judge", same_text=True) for members in groups(results).values()
            for a, b in combinations(members, 2) if differing(a, b) == ["judge"]]
