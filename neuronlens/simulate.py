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

from neuronlens.backends.base import Backend, BackendError, PromptLogprobRequest, Usage
from neuronlens.errors import UserError
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

def _pairs(text: str) -> list[tuple[str, int]]:
    """Hand-written example excerpts: tokens separated by '|', an activation after '@'."""
    out = []
    for piece in text.split("|"):
        token, _, act = piece.rpartition("@")
        out.append((token, int(act)) if token else (piece, 0))
    return out


# Hand-made example neurons with true activations, to show the format (our own words). A few
# examples of realistic length teach a small simulator the task; they are part of the prefix
# every excerpt of a neuron shares, so they cost one forward pass per neuron, not per excerpt.
FEWSHOT: tuple[tuple[str, list[tuple[str, int]]], ...] = (
    ("days of the week", _pairs(
        "We| meet| every| Monday@10| and| Thursday@9| at| noon|,| but| not| on| weekends@3|.|"
        " The| market| opens| on| Saturday@10| morning| and| closes| Sunday@9| night|.|"
        " See| you| on| Friday@10|!")),
    ("closing brackets and parentheses in code", _pairs(
        "if| (|x| >| 0@0|)@8| {|\n|  | return| f|(|x|)@9|;|\n|}@7|\n|"
        "values| =| [|1|,| 2|,| 3|]@8|\n|print|(|len|(|values|)@8|)@10")),
    ("words about cooking and food preparation", _pairs(
        "Pre|heat@6| the| oven@8| to| 200| degrees|,| then| chop@9| the| onions@5| and| fry@9|"
        " them| in| butter@6| until| golden@4|.| The| train| left| the| station| at| six|,|"
        " so| we| simmer@8|ed| the| sauce@6| while| we| waited|.")),
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
    examples = FEWSHOT if fewshot else ()
    for label, (ex_expl, pairs) in enumerate(examples, 1):
        lines = [f"{format_token(t)}\t{a}\n" for t, a in pairs]
        parts += [_block(label, ex_expl, lines) + "<end>", ""]
    return "\n".join(parts) + "\n" + _block(len(examples) + 1, explanation.strip().rstrip("."), [])


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
            raise UserError(f"Unknown simulator strategy {strategy!r}; choose one of "
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
