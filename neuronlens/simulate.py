"""The simulation engine: predict a neuron's activations from an explanation alone.

All-at-once logprob simulation: the simulator sees the explanation and an excerpt's tokens, each
followed by the placeholder ``unknown``; at every placeholder we read its probability distribution
over "0".."10" and take the expected value. Every excerpt of a neuron shares the prompt up to the
excerpt (instructions, few-shot example, explanation), so a backend that reuses that prefix scores
a whole neuron in little more than one forward pass over the excerpts' own tokens.

A failed excerpt (a backend error, a distribution with no mass on any number) is reported as
``None`` and counted, never turned into zeros.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

from neuronlens.backends.base import (Backend, BackendError, PromptLogprobRequest, Usage)
from neuronlens.explain import PHRASE, format_token
from neuronlens.records import ActivationRecord

log = logging.getLogger(__name__)

CANDIDATES = tuple(str(i) for i in range(11))
PLACEHOLDER = "unknown"

INSTRUCTIONS = """\
We are studying the neurons of a language model. A neuron reads text one token at a time and \
gives, at each token, an activation from 0 (no response) to 10 (its strongest response). Most \
tokens get 0. Given a description of what a neuron responds to, predict its activation on every \
token of an excerpt. Each line is a token, a tab, then the activation; "unknown" marks an \
activation you are to predict."""

# One hand-made example neuron with true activations, to show the format (our own words).
FEWSHOT = (
    "days of the week",
    [("We", 0), (" meet", 0), (" every", 0), (" Monday", 10), (" and", 0), (" Thursday", 9),
     (",", 0), (" but", 0), (" not", 0), (" on", 0), (" weekends", 3), (".", 0)],
)


@dataclass(frozen=True)
class SimulationResult:
    """Per excerpt: expected activations (0-10 scale) and distributions, or None where it failed."""

    expected: tuple[tuple[float, ...] | None, ...]
    distributions: tuple[tuple[tuple[float, ...], ...] | None, ...]
    errors: tuple[str, ...] = ()
    usage: Usage = field(default_factory=Usage)

    @property
    def n_failed(self) -> int:
        return sum(e is None for e in self.expected)


def _block(label: int, explanation: str, lines: list[str]) -> str:
    return (f"Neuron {label}\nExplanation of neuron {label}: {PHRASE} {explanation}.\n"
            "Activations:\n<start>\n" + "".join(lines))


def prompt_prefix(explanation: str, fewshot: bool = True) -> str:
    """Everything before the excerpt: shared by every excerpt of a neuron."""
    parts = [INSTRUCTIONS, ""]
    label = 1
    if fewshot:
        ex_expl, pairs = FEWSHOT
        parts += [_block(1, ex_expl, [f"{format_token(t)}\t{a}\n" for t, a in pairs]) + "<end>", ""]
        label = 2
    return "\n".join(parts) + "\n" + _block(label, explanation.strip().rstrip("."), [])


def build_request(explanation: str, tokens: Sequence[str],
                  fewshot: bool = True) -> PromptLogprobRequest:
    prompt = prompt_prefix(explanation, fewshot)
    positions = []
    for token in tokens:
        prompt += format_token(token) + "\t"
        positions.append(len(prompt))
        prompt += PLACEHOLDER + "\n"
    prompt += "<end>\n"
    return PromptLogprobRequest(prompt, tuple(positions), CANDIDATES)


def expected_value(probs: Sequence[float]) -> float:
    return float(sum(int(c) * p for c, p in zip(CANDIDATES, probs)))


class Simulator:
    """Simulates excerpts from an explanation on a backend.

    ``strategy``: ``auto`` picks the best the backend declares it can do; ``all_at_once`` needs
    prompt logprobs.
    """

    STRATEGIES = ("auto", "all_at_once")

    def __init__(self, backend: Backend, strategy: str = "auto", fewshot: bool = True):
        if strategy not in self.STRATEGIES:
            raise ValueError(f"Unknown simulator strategy {strategy!r}; choose one of "
                             f"{', '.join(self.STRATEGIES)}.")
        self.backend, self.requested, self.fewshot = backend, strategy, fewshot

    @property
    def strategy(self) -> str:
        caps = self.backend.capabilities
        if self.requested in ("auto", "all_at_once") and caps.prompt_logprobs:
            return "all_at_once"
        raise BackendError(f"The {self.backend.name} backend cannot score prompts, which the "
                           f"{self.requested} simulator strategy needs; use a backend with prompt "
                           "logprobs (local, vllm) or another strategy.")

    def check(self) -> None:
        """Fail at start-up, not hours later, when the backend cannot run this strategy."""
        _ = self.strategy

    def simulate(self, explanation: str, records: Sequence[ActivationRecord]) -> SimulationResult:
        if not records:
            return SimulationResult((), ())
        requests = [build_request(explanation, r.tokens, self.fewshot) for r in records]
        try:
            dists = self.backend.prompt_logprobs(requests)
        except BackendError as e:
            log.warning("simulation failed for %d excerpts: %s", len(records), e)
            return SimulationResult((None,) * len(records), (None,) * len(records),
                                    (str(e),) * len(records))
        expected, distributions, errors, usage = [], [], [], Usage()
        for i, d in enumerate(dists):
            usage = usage + d.usage
            if len(d.probs) != len(records[i].tokens) or any(m <= 0 for m in d.mass):
                expected.append(None)
                distributions.append(None)
                errors.append(f"excerpt {i}: no probability on any of 0-10 at some token")
                continue
            expected.append(tuple(expected_value(p) for p in d.probs))
            distributions.append(d.probs)
        return SimulationResult(tuple(expected), tuple(distributions), tuple(errors), usage)
