"""The simulation engine: predict a neuron's activations from an explanation alone.

All-at-once logprob simulation: the simulator sees the explanation and an excerpt's tokens, each
followed by the placeholder ``unknown``; at every placeholder we read its probability distribution
over "0".."10" and take the expected value. Every excerpt of a neuron shares the prompt up to the
excerpt (instructions, few-shot example, explanation), so a backend that reuses that prefix scores
a whole neuron in little more than one forward pass over the excerpts' own tokens.

Backends without prompt logprobs (chat APIs) get strategies that read output logprobs instead,
or none at all (``neuronlens.scorers.strategies``); whatever the strategy, the result is the same type.
A failed excerpt (a backend error after the policy's retries, a prompt the server's tokens do not
align with, an answer that cannot be read) is reported as ``None`` and kept with its reason and
kind (`Failure`), never turned into zeros.

A token where the simulator puts no probability at all on "0".."10" (only possible when a remote
server returns a top-k that holds none of them) gets the expected value 0, as OpenAI's reference
does, and its ``mass`` of 0 says so; the local backend's softmax is exact, so its mass is never 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

from neuronlens.scorers import reference_prompt
from neuronlens.backends.base import (
    Backend,
    BackendError,
    Completion,
    GenerateRequest,
    Generation,
    PromptLogprobRequest,
    TokenDistributions,
    TransientError,
    Unscorable,
    Usage,
    failure_kind,
)
from neuronlens.errors import UserError
from neuronlens.prompt_format import PHRASE, format_token
from neuronlens.records import ActivationRecord
from neuronlens.scorers.base import Failure, Scored, Scorer, SimulationResult
from neuronlens.scorers.strategies import (
    NUMBERS,
    UNKNOWN,
    SharedPrompt,
    Unreadable,
    json_request,
    one_at_a_time_request,
    one_hot,
    parse_json,
    parse_one,
    parse_sequence,
    sequence_request,
)

log = logging.getLogger(__name__)
Distributions = tuple[tuple[float, ...], ...]
T = TypeVar("T")


def generate_checked(backend: Backend, request: GenerateRequest,
                     parse: Callable[[Completion], object]) -> Generation:
    """The backend's generation, where an answer that does not parse (``Unreadable``) is never
    cached; the caller counts its tokens, then parses it."""
    def usable(generation: Generation) -> bool:
        try:
            parse(first(generation))
        except Unreadable:
            return False
        return True

    return backend.generate_usable(request, usable)


def first(generation: Generation) -> Completion:
    if not generation.completions:
        raise Unreadable("the backend returned no completion")
    return generation.completions[0]


@dataclass
class _Tally:
    """Tokens spent by one ``simulate`` call, failed requests included."""

    usage: Usage = field(default_factory=Usage)


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


@dataclass(frozen=True)
class Example:
    """A hand-made example neuron (our own words): its explanation, an excerpt with true
    activations, and how many of the excerpt's first lines show "unknown" instead of their value.
    Those lines are the method's device for the all-at-once prompt: a listing that begins with
    "unknown" goes on with numbers, so a placeholder stands for a number to predict. (Measured on
    the control rules with SmolLM2-135M, they left the digit mass where it was, 0.35 before and
    0.34 after: ``benchmarks/results/prompts*.md``.)"""

    explanation: str
    pairs: list[tuple[str, int]]
    hidden: int = 0

    def lines(self, raw: bool) -> list[str]:
        return [f"{format_token(token, newlines=raw)}\t{UNKNOWN if i < self.hidden else a}\n"
                for i, (token, a) in enumerate(self.pairs)]


# A few examples of realistic length teach a small simulator the task; they are part of the
# prefix every excerpt of a neuron shares, so they cost one forward pass per neuron, not per excerpt.
FEWSHOT: tuple[Example, ...] = (
    Example("days of the week", _pairs(
        "We| meet| every| Monday@10| and| Thursday@9| at| noon|,| but| not| on| weekends@3|.|"
        " The| market| opens| on| Saturday@10| morning| and| closes| Sunday@9| night|.|"
        " See| you| on| Friday@10|!"), hidden=5),
    Example("closing brackets and parentheses in code", _pairs(
        "if| (|x| >| 0@0|)@8| {|\n|  | return| f|(|x|)@9|;|\n|}@7|\n|"
        "values| =| [|1|,| 2|,| 3|]@8|\n|print|(|len|(|values|)@8|)@10"), hidden=9),
    Example("words about cooking and food preparation", _pairs(
        "Pre|heat@6| the| oven@8| to| 200| degrees|,| then| chop@9| the| onions@5| and| fry@9|"
        " them| in| butter@6| until| golden@4|.| The| train| left| the| station| at| six|,|"
        " so| we| simmer@8|ed| the| sauce@6| while| we| waited|.")),
    Example("years written as four-digit numbers", _pairs(
        "The| bridge| opened| in| |1@4|9@7|3@9|7@10|,| closed| for| repairs| in| |1@4|9@7|8@9|9@10|"
        " and| carried| 4|0|,|0|0|0| cars| a| day| by| |2@4|0@6|1@9|5@10|.| Tickets| cost| $|3|.|5|0|"
        " and| the| toll| booth| at| gate| 1|2| closed| at| 6| pm|.| A| plaque| from| |1@3|9@6|3@8|7@10|"
        " still| hangs| on| the| north| tower|,| next| to| a| list| of| 2|4| workers|."), hidden=12),
    Example("complaints and negative opinions in reviews", _pairs(
        "I| ordered| the| blue| jacket| last| week|.| The| zipper| broke@8| on| the| first| day|,|"
        " the| sleeves| are| far| too@3| short@5|,| and| the| colour| faded@7| after| one| wash|.|"
        " Customer| service| never| replied@6|.| On| the| plus| side|,| the| pockets| are| deep| and|"
        " delivery| was| fast|.| Overall| a| disappointing@9| purchase|;| I| would| not@6| buy@4|"
        " it| again|."), hidden=3),
)


def _block(label: int, explanation: str, lines: list[str]) -> str:
    return (f"Neuron {label}\nExplanation of neuron {label}: {PHRASE} {explanation}.\n"
            "Activations:\n<start>\n" + "".join(lines))


def prompt_body(explanation: str, fewshot: bool = True, raw: bool = False) -> str:
    """The prompt after the instructions: the few-shot examples, then the neuron being simulated,
    up to and including its "<start>" line (a chat user message begins with it). ``raw``: newlines
    written as they are, as the method writes them (the all-at-once prompt); else escaped, so that
    an answer that copies the lines can be read line by line. Tabs are always escaped: a raw tab
    token would merge with the line's own tab."""
    examples = FEWSHOT if fewshot else ()
    blocks = [_block(label, ex.explanation, ex.lines(raw)) + "<end>"
              for label, ex in enumerate(examples, 1)]
    blocks.append(_block(len(examples) + 1, explanation.strip().rstrip("."), []))
    return "\n\n".join(blocks)


def prompt_prefix(explanation: str, fewshot: bool = True, raw: bool = False) -> str:
    """Everything before the excerpt: shared by every excerpt of a neuron."""
    return f"{INSTRUCTIONS}\n\n{prompt_body(explanation, fewshot, raw)}"


def build_request(explanation: str, tokens: Sequence[str],
                  fewshot: bool = True) -> PromptLogprobRequest:
    """The all-at-once prompt: every token (newlines raw), a tab, then the placeholder whose
    distribution over "0".."10" is read."""
    prompt = prompt_prefix(explanation, fewshot, raw=True)
    positions = []
    for token in tokens:
        prompt += format_token(token, newlines=True) + "\t"
        positions.append(len(prompt))
        prompt += UNKNOWN + "\n"
    prompt += "<end>\n"
    return PromptLogprobRequest(prompt, tuple(positions), NUMBERS)


def expected_value(probs: Sequence[float]) -> float:
    return float(sum(int(c) * p for c, p in zip(NUMBERS, probs)))


def resolve_strategy(backend: Backend, requested: str) -> str:
    """The strategy ``requested`` means on ``backend``, or a BackendError saying what is missing.

    ``auto``: all at once with prompt logprobs, else the generated sequence with output logprobs,
    else JSON (no logprobs)."""
    caps, name = backend.capabilities, backend.name
    text = caps.chat or caps.completion
    if requested == "auto":
        if caps.prompt_logprobs:
            return "all_at_once"
        if text:
            return "generated_sequence" if caps.output_logprobs else "json"
        raise BackendError(f"The {name} backend cannot score prompts and generates no text, so it "
                           "cannot simulate; use a backend with prompt logprobs or chat.")
    if requested == "all_at_once" and not caps.prompt_logprobs:
        raise BackendError(f"The {name} backend cannot score prompts, which the {requested} "
                           "simulator strategy needs; use a backend with prompt logprobs (local, "
                           "vllm) or another strategy.")
    if requested != "all_at_once" and not text:
        raise BackendError(f"The {name} backend offers neither chat nor completion, which the "
                           f"{requested} simulator strategy needs.")
    if requested in ("one_at_a_time", "generated_sequence") and not caps.output_logprobs:
        raise BackendError(f"The {name} backend returns no output logprobs, which the {requested} "
                           "simulator strategy needs; use strategy=json or another backend.")
    return requested


class Simulator(Scorer):
    """Simulates excerpts from an explanation on a backend.

    ``strategy``: ``auto`` picks the best the backend declares it can do (see
    ``resolve_strategy``); ``all_at_once`` needs prompt logprobs, ``one_at_a_time`` and
    ``generated_sequence`` output logprobs, ``json`` only text (see ``neuronlens.scorers.strategies``).
    Retries belong to the policy layer around remote backends (``backends/policy.py``); an error
    that reaches the engine (a ``TransientError`` after the retries, an unscorable prompt, an
    unreadable answer) fails its excerpt(s) alone, counted and kept in ``errors``; a
    ``BackendError`` (bad key, unknown model) stops the run with its one clear line.
    """

    STRATEGIES = ("auto", "all_at_once", "one_at_a_time", "generated_sequence", "json")
    PROMPTS = ("neuronlens", "openai")

    def __init__(self, backend: Backend, strategy: str = "auto", fewshot: bool = True,
                 prompt: str = "neuronlens"):
        if strategy not in self.STRATEGIES:
            raise UserError(f"Unknown simulator strategy {strategy!r}; choose one of "
                             f"{', '.join(self.STRATEGIES)}.")
        if prompt not in self.PROMPTS:
            raise UserError(f"Unknown simulation prompt {prompt!r}; choose one of "
                            f"{', '.join(self.PROMPTS)}.")
        if prompt == "openai":
            reference_prompt.check()
        self.backend, self.requested, self.fewshot, self.prompt = backend, strategy, fewshot, prompt

    @property
    def strategy(self) -> str:
        return resolve_strategy(self.backend, self.requested)

    def check(self) -> None:
        """Fail at start-up, not hours later, when the backend cannot run this strategy."""
        if self.prompt == "openai" and self.strategy != "all_at_once":
            raise UserError(f"simulation.prompt=openai is the reference's all-at-once prompt, which "
                            f"needs prompt logprobs; the {self.backend.name} backend simulates "
                            f"with {self.strategy}, so use simulation.prompt=neuronlens or a "
                            "backend with prompt logprobs (local, vllm).")
        if self.strategy == "json" and self.requested == "auto":
            log.warning("The %s backend returns no logprobs: simulating with JSON answers, so "
                        "every simulated activation is a whole number.", self.backend.name)

    def simulate(self, explanation: str, records: Sequence[ActivationRecord]) -> SimulationResult:
        if not records:
            return SimulationResult((), ())
        strategy = self.strategy
        if strategy == "all_at_once":
            return self._all_at_once([explanation], records)[0]
        caps = self.backend.capabilities
        shared = SharedPrompt(prompt_prefix(explanation, self.fewshot), INSTRUCTIONS,
                              prompt_body(explanation, self.fewshot),
                              chat=caps.chat and not caps.completion)
        excerpt = {"one_at_a_time": self._one_at_a_time,
                   "generated_sequence": self._generated_sequence, "json": self._json}[strategy]
        expected, distributions, errors, tally = [], [], [], _Tally()
        for i, record in enumerate(records):
            try:
                probs = excerpt(shared, record.tokens, tally)
            except (Unreadable, TransientError, Unscorable) as e:  # a BackendError is fatal
                expected.append(None)
                distributions.append(None)
                errors.append(Failure(i, failure_kind(e), str(e)))
                continue
            expected.append(tuple(expected_value(p) for p in probs))
            distributions.append(probs)
        if errors:
            log.warning("%s simulation failed for %d of %d excerpts; first: %s", strategy,
                        len(errors), len(records), errors[0])
        return SimulationResult(tuple(expected), tuple(distributions), tuple(errors), tally.usage)

    def _generate(self, request: GenerateRequest, tally: _Tally, parse: Callable[[Completion], T]) -> T:
        generation = generate_checked(self.backend, request, parse)
        tally.usage = tally.usage + generation.usage   # a failed answer's tokens count too
        return parse(first(generation))

    def _one_at_a_time(self, shared: SharedPrompt, tokens: Sequence[str],
                       tally: _Tally) -> Distributions:
        return tuple(self._generate(one_at_a_time_request(shared, tokens, i), tally, parse_one)
                     for i in range(len(tokens)))

    def _generated_sequence(self, shared: SharedPrompt, tokens: Sequence[str],
                            tally: _Tally) -> Distributions:
        return self._generate(sequence_request(shared, tokens), tally,
                              lambda c: parse_sequence(c, tokens))

    def _json(self, shared: SharedPrompt, tokens: Sequence[str], tally: _Tally) -> Distributions:
        values = self._generate(json_request(shared, tokens), tally,
                                lambda c: parse_json(c, len(tokens), not shared.chat))
        return tuple(one_hot(v) for v in values)

    def score_many(self, explanations: Sequence[str], top: Sequence[ActivationRecord],
                   random: Sequence[ActivationRecord]) -> list[Scored]:
        """Best-of-n candidates scored on the same excerpts: with prompt logprobs, in one call to
        the backend (the local one computes the instructions once and each explanation once, and
        batches the excerpts of every candidate together)."""
        records = [*top, *random]
        if not records or self.strategy != "all_at_once":
            return super().score_many(explanations, top, random)
        return [self.scored(r, top, random) for r in self._all_at_once(explanations, records)]

    def _all_at_once(self, explanations: Sequence[str],
                     records: Sequence[ActivationRecord]) -> list[SimulationResult]:
        """Each explanation's simulation of ``records``, all in one ``prompt_logprobs`` call."""
        if self.prompt == "openai":
            requests = [reference_prompt.reference_request(e, r.tokens, NUMBERS)
                        for e in explanations for r in records]
        else:
            requests = [build_request(e, r.tokens, self.fewshot) for e in explanations for r in records]
        try:
            dists = self.backend.prompt_logprobs(requests)
        except (TransientError, Unscorable) as e:  # a BackendError (bad key, model) is fatal
            log.warning("simulation failed for %d excerpts: %s", len(requests), e)
            failed = SimulationResult((None,) * len(records), (None,) * len(records),
                                      tuple(Failure(i, failure_kind(e), str(e)) for i in range(len(records))))
            return [failed] * len(explanations)
        n = len(records)
        return [self._result(records, dists[k * n:(k + 1) * n]) for k in range(len(explanations))]

    def _result(self, records: Sequence[ActivationRecord],
                dists: Sequence[TokenDistributions]) -> SimulationResult:
        """The simulation of ``records`` from their distributions (one per excerpt)."""
        expected, distributions, errors, mass, bound, usage = [], [], [], [], [], Usage()
        for i, d in enumerate(dists):
            usage = usage + d.usage
            failure = None
            if d.error is not None:
                failure = Failure(i, d.kind or "unscorable", d.error)
            elif len(d.probs) != len(records[i].tokens):
                failure = Failure(i, "wrong_length", f"{len(d.probs)} distributions for "
                                                     f"{len(records[i].tokens)} tokens")
            if failure is not None:
                expected.append(None)
                distributions.append(None)
                mass.append(None)
                bound.append(None)
                errors.append(failure)
                continue
            expected.append(tuple(expected_value(p) for p in d.probs))
            distributions.append(d.probs)
            mass.append(d.mass)
            bound.append(max(d.bound, default=0.0))
        if errors:
            log.warning("simulation failed for %d of %d excerpts; first: %s", len(errors),
                        len(records), errors[0])
        return SimulationResult(tuple(expected), tuple(distributions), tuple(errors), usage,
                                tuple(mass), tuple(bound))
