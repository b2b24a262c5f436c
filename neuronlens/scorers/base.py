"""What every scorer is: an explanation and excerpts in, per-token predictions and a score out.

A scorer predicts a neuron's activation at every token of some excerpts from an explanation
alone (``simulate``), and ``score`` correlates those predictions with the true activations, over
a neuron's top excerpts, its random ones, and both together (Bills et al. 2023). Two kinds live
here: the simulation engine (``Simulator``: an LLM reads the explanation and predicts 0-10 per
token, on any backend and strategy) and the similarity judge (an embedding model, no LLM). A
scorer with another metric (detection, fuzzing) overrides ``score`` and keeps the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from neuronlens.backends.base import Usage
from neuronlens.records import ActivationRecord
from neuronlens.scorers.correlation import score_splits


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

    @property
    def n_failed(self) -> int:
        return sum(e is None for e in self.expected)

    @property
    def errors(self) -> tuple[str, ...]:
        return tuple(str(f) for f in self.failures)


@dataclass(frozen=True)
class Scored:
    """One explanation scored on a neuron's top and random excerpts: the predictions (aligned
    with ``top + random``, None where an excerpt failed) and the scores on ``top``, ``random``
    and ``all`` (``ScoredSimulation.to_json()`` each) over the excerpts that did not fail."""

    result: SimulationResult
    scores: dict[str, dict[str, Any]]

    def kept(self) -> list[int]:
        """Indices into ``top + random`` of the excerpts that were predicted."""
        return [i for i, e in enumerate(self.result.expected) if e is not None]


@runtime_checkable
class Scorer(Protocol):
    """Subclass it (or match it): ``simulate`` is the one method to write."""

    backend = None   # the LLM backend behind it, if any: the run reports its requests and cost

    def check(self) -> None:
        """Fail at start-up, before anything slow, when this scorer cannot run as configured."""

    def simulate(self, explanation: str, records: Sequence[ActivationRecord]) -> SimulationResult:
        """Predicted activations of every token of ``records`` from ``explanation`` alone."""
        ...

    def score(self, explanation: str, top: Sequence[ActivationRecord],
              random: Sequence[ActivationRecord]) -> Scored:
        """``explanation`` scored on ``top`` and ``random`` excerpts, simulated together (one
        shared prompt prefix)."""
        records = [*top, *random]
        result = self.simulate(explanation, records)
        kept = [(r, list(e), i < len(top)) for i, (r, e) in enumerate(zip(records, result.expected))
                if e is not None]
        pick = lambda is_top: ([r.activations for r, _, t in kept if t == is_top],   # noqa: E731
                               [e for _, e, t in kept if t == is_top])
        scores = score_splits(*pick(True), *pick(False))
        return Scored(result, {name: s.to_json() for name, s in scores.items()})
