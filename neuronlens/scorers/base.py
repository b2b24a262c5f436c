"""What every scorer is: an explanation and excerpts in, predictions and a score out.

A scorer predicts a neuron's activation at every token of some excerpts from an explanation
alone (``simulate``), and ``score`` measures those predictions against the true activations over
a neuron's top excerpts, its random ones, and both together (Bills et al. 2023). Each scorer
declares its ``metric`` (name, range, which way is better): the simulators' is the correlation.
Two kinds live here: the simulation engine (``Simulator``: an LLM reads the explanation and
predicts 0-10 per token, on any backend and strategy) and the similarity judge (an embedding
model, no LLM). A scorer with another metric declares it and overrides ``measure``, or, where it
does not predict per token (detection and fuzzing, ``classification``), ``score``: everything that
reads a score (``value``, judge power, best-of-n, the summary) stays the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from neuronlens.backends.base import Usage
from neuronlens.records import ActivationRecord
from neuronlens.scorers.correlation import correlate
from neuronlens.summary import CORRELATION, headline

@dataclass(frozen=True)
class Metric:
    """What a scorer's number is: its ``name`` (the key of its value in each split's scores, and
    the ``metric`` of a row), its range, and which way is better."""

    name: str
    low: float
    high: float
    higher_is_better: bool = True

    def rank(self, value: float | None) -> float:
        """A key that sorts better values higher, and None lowest (for picking the best)."""
        if value is None:
            return float("-inf")
        return value if self.higher_is_better else -value


PEARSON = Metric(CORRELATION, -1.0, 1.0)


@dataclass(frozen=True)
class Failure:
    """Why excerpt ``excerpt`` (its index in the records simulated) failed; ``kind`` is the short
    name summaries count it under (``timeout``, ``misaligned``, ``unreadable``, ...)."""

    excerpt: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"excerpt {self.excerpt}: {self.message}"

    def to_json(self) -> dict:
        return {"excerpt": self.excerpt, "kind": self.kind, "message": self.message}


@dataclass(frozen=True)
class SimulationResult:
    """Per excerpt: expected activations (0-10 scale), None where it failed; the distributions
    behind them (None for simulators that predict values directly, such as the similarity judge);
    and, where the simulator gives distributions, the probability ``mass`` it put on "0".."10" at
    each token before renormalising."""

    expected: tuple[tuple[float, ...] | None, ...]
    distributions: tuple[tuple[tuple[float, ...], ...] | None, ...]
    failures: tuple[Failure, ...] = ()
    usage: Usage = field(default_factory=Usage)
    mass: tuple[tuple[float, ...] | None, ...] = ()
    bound: tuple[float | None, ...] = ()   # per excerpt, how far follow-ups a remote backend
                                           # skipped (opt-in) can move any expected value

    @property
    def n_failed(self) -> int:
        return sum(e is None for e in self.expected)

    @property
    def errors(self) -> tuple[str, ...]:
        return tuple(str(f) for f in self.failures)


class Predicted(NamedTuple):
    """An excerpt that was predicted: its index in ``top + random``, its record, its predictions."""

    index: int
    record: ActivationRecord
    predicted: list[float]


def split_predictions(top: Sequence[ActivationRecord], random: Sequence[ActivationRecord],
                      expected: Sequence[Sequence[float] | None]) -> dict[str, list[Predicted]]:
    """The excerpts of ``top + random`` that were predicted (``expected`` is aligned with them,
    None where one failed) as ``top``, ``random`` and ``all`` (tops first): the one place that
    splits results into top and random."""
    kept = [Predicted(i, r, list(e)) for i, (r, e) in enumerate(zip([*top, *random], expected))
            if e is not None]
    tops = [p for p in kept if p.index < len(top)]
    return {"top": tops, "random": kept[len(tops):], "all": kept}


@dataclass(frozen=True)
class Scored:
    """One explanation scored on a neuron's top and random excerpts: the predictions (aligned
    with ``top + random``, None where an excerpt failed) and the scores on ``top``, ``random``
    and ``all`` (``Scorer.measure`` each: the metric's value under its name, and a ``flag``) over
    the excerpts that did not fail."""

    result: SimulationResult
    scores: dict[str, dict[str, Any]]
    metric: Metric = PEARSON
    # per excerpt of ``top + random``, for scorers that answer per item rather than per token
    # (detection, fuzzing): each item's true ``label``, its ``answer`` and P("1") ``p``; () where
    # none was asked, None where the excerpt failed
    predictions: tuple[tuple[dict, ...] | None, ...] = ()

    def value(self, split: str = "all") -> float | None:
        """The metric's value on ``split``, as the headline counts it (``summary.headline``)."""
        return headline(self.scores.get(split), self.metric.name)


@runtime_checkable
class Scorer(Protocol):
    """Subclass it (or match it): ``simulate`` is the one method to write; a scorer whose metric
    is not the correlation declares ``metric`` and writes ``measure`` too."""

    backend = None   # the LLM backend behind it, if any: the run reports its requests and cost
    metric: Metric = PEARSON
    per_token = True   # False: it answers per item (``Scored.predictions``), not per token
    quantiles = False  # True: ``score`` takes the split's quantile samples too (``quantile=``)

    def check(self) -> None:
        """Fail at start-up, before anything slow, when this scorer cannot run as configured."""

    def simulate(self, explanation: str, records: Sequence[ActivationRecord]) -> SimulationResult:
        """Predicted activations of every token of ``records`` from ``explanation`` alone."""
        ...

    def measure(self, true: list[list[float]], predicted: list[list[float]]) -> dict[str, Any]:
        """The scores of predictions against the true activations of some excerpts (all tokens
        concatenated): the metric's value under ``metric.name`` (None where undefined) and a
        ``flag`` saying why it is undefined; other figures may come along."""
        return correlate(true, predicted).to_json()

    def score(self, explanation: str, top: Sequence[ActivationRecord],
              random: Sequence[ActivationRecord]) -> Scored:
        """``explanation`` scored on ``top`` and ``random`` excerpts, simulated together (one
        shared prompt prefix)."""
        return self.scored(self.simulate(explanation, [*top, *random]), top, random)

    def score_many(self, explanations: Sequence[str], top: Sequence[ActivationRecord],
                   random: Sequence[ActivationRecord]) -> list[Scored]:
        """``score`` for each of ``explanations`` (best-of-n candidates); a scorer whose backend
        can simulate them together overrides it."""
        return [self.score(e, top, random) for e in explanations]

    def scored(self, result: SimulationResult, top: Sequence[ActivationRecord],
               random: Sequence[ActivationRecord]) -> Scored:
        """The scores of ``result``, the simulation of ``top + random``."""
        splits = split_predictions(top, random, result.expected)
        scores = {name: self.measure([p.record.activations for p in kept], [p.predicted for p in kept])
                  for name, kept in splits.items()}
        return Scored(result, scores, self.metric)
