"""What detection and fuzzing share: an LLM reads an explanation and a few numbered excerpts and
answers 1 or 0 for each, as one JSON list; the answers are scored as a binary classifier.

Each scorer (``detection``, ``fuzzing``) turns a neuron's top and random excerpts into items: an
excerpt as shown (fuzzing marks some of its tokens) with its true label. Items are shuffled
(seeded by the seed and the excerpts, so the labels' order differs between neurons and never
follows the example's) and sent ``examples_per_prompt`` at a time, after the scorer's instructions and one
hand-written example with as many excerpts as the prompt asks about (small models copy its
length). Where the backend gives output logprobs, each answer's P("1") is read at the
token that writes it (P("1") / (P("0") + P("1")) over its top alternatives), which gives an AUC;
otherwise the AUC is left out. An answer that is not a list of as many 0s and 1s as there were
excerpts fails every excerpt of its prompt, counted with its reason; it is never read as a label.

The declared metric is the balanced accuracy (chance: 0.5 whatever the classes' sizes); accuracy,
precision, recall, F1 and the AUC come with it. Only excerpts of the split being scored are ever
shown, so the explainer's train excerpts stay out of scoring as they do for simulation.

With the default recording (``top_k``/``n_random`` 32, test 30%) a neuron has about 10 top and 10
random test excerpts: one neuron's balanced accuracy then has a standard error near 0.11, so a
single neuron says little, and means over neurons (and judge power) are what to read. Record
more excerpts (``recording.top_k``, ``recording.n_random``) for per-neuron figures.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

from neuronlens.backends.base import Backend, Completion, GenerateRequest, Message, TransientError, Unscorable, \
    Usage, failure_kind
from neuronlens.errors import UserError
from neuronlens.prompt_format import format_token
from neuronlens.records import ActivationRecord
from neuronlens.scorers.base import Failure, Metric, Scored, Scorer, SimulationResult
from neuronlens.scorers.simulation import first, generate_checked
from neuronlens.scorers.strategies import Unreadable, alternatives, parse_json

log = logging.getLogger(__name__)

BALANCED_ACCURACY = Metric("balanced_accuracy", 0.0, 1.0)
NO_EXAMPLES = "no examples"
ONE_CLASS = "one class"
ASK = "Answer with the JSON list of {n} numbers (0 or 1) and nothing else."
CUE = "Answer ({n} numbers): ["   # the example's answer, and what a completion model continues


@dataclass(frozen=True)
class Item:
    """One question: excerpt ``excerpt`` (its index in ``top + random``) as ``shown``, and the
    true answer ``label`` (1: it activates, or its marks are right)."""

    excerpt: int
    shown: str
    label: int


def shown(tokens: Sequence[str], marked: Sequence[int] = ()) -> str:
    """An excerpt on one line, the tokens at ``marked`` between << and >> (runs joined)."""
    marked, out = set(marked), []
    for i, token in enumerate(tokens):
        text = format_token(token)
        if i in marked and i - 1 not in marked:
            text = "<<" + text
        if i in marked and i + 1 not in marked:
            text += ">>"
        out.append(text)
    return "".join(out)


def binary_scores(labels: Sequence[int], predicted: Sequence[int],
                  probs: Sequence[float | None]) -> dict[str, Any]:
    """Balanced accuracy (the metric), accuracy, precision, recall, F1 and, where every answer has
    a probability, the AUC; a flag says why the balanced accuracy is undefined."""
    from sklearn import metrics

    out: dict[str, Any] = {"n": len(labels), "n_positive": int(sum(labels))}
    if not labels:
        return out | {BALANCED_ACCURACY.name: None, "flag": NO_EXAMPLES}
    out["accuracy"] = float(metrics.accuracy_score(labels, predicted))
    out["precision"] = float(metrics.precision_score(labels, predicted, zero_division=0))
    out["recall"] = float(metrics.recall_score(labels, predicted, zero_division=0))
    out["f1"] = float(metrics.f1_score(labels, predicted, zero_division=0))
    both = 0 < sum(labels) < len(labels)
    out[BALANCED_ACCURACY.name] = float(metrics.balanced_accuracy_score(labels, predicted)) if both else None
    out["auc"] = (float(metrics.roc_auc_score(labels, probs))
                  if both and all(p is not None for p in probs) else None)
    out["flag"] = None if both else ONE_CLASS
    return out


def answer_probabilities(completion: Completion, n: int) -> list[float | None]:
    """P("1") of each of the ``n`` answers, read at the tokens that write them; Nones where the
    backend gave no logprobs or the answer's tokens cannot be lined up with its numbers."""
    clean = lambda t: t.strip().strip("[],").strip()   # noqa: E731
    steps = [lp for lp in completion.logprobs or () if clean(lp.token) in ("0", "1")]
    if len(steps) != n:
        return [None] * n
    out = []
    for step in steps:
        mass = {"0": 0.0, "1": 0.0}
        for token, logprob in alternatives(step):
            if clean(token) in mass:
                mass[clean(token)] += math.exp(logprob)
        total = mass["0"] + mass["1"]
        out.append(mass["1"] / total if total > 0 else None)
    return out


class ListClassifier(Scorer):
    """A scorer that asks a backend yes-or-no questions about excerpts, several to a prompt.
    Subclasses write ``items`` and the prompt's ``INSTRUCTIONS`` and ``EXAMPLE`` (an explanation,
    excerpts as shown and their answers)."""

    metric = BALANCED_ACCURACY
    per_token = False   # one prediction per item, not per token
    quantiles = True    # it reads the split's quantile samples too (``score(..., quantile)``)
    INSTRUCTIONS = ""
    EXAMPLE: tuple[str, tuple[tuple[str, int], ...]] = ("", ())

    def __init__(self, backend: Backend, examples_per_prompt: int = 5, threshold: float = 0.25,
                 seed: int = 0, top_logprobs: int = 20):
        if examples_per_prompt < 1:
            raise UserError(f"examples_per_prompt must be 1 or more; got {examples_per_prompt}.")
        if not 0 < threshold < 1:
            raise UserError(f"threshold is a fraction of the neuron's largest top activation, "
                            f"between 0 and 1; got {threshold}.")
        self.backend, self.per_prompt, self.threshold = backend, examples_per_prompt, threshold
        self.seed, self.top_logprobs = seed, top_logprobs

    def check(self) -> None:
        caps = self.backend.capabilities
        if not (caps.chat or caps.completion):
            raise UserError(f"The {self.backend.name} backend generates no text; "
                            f"{type(self).__name__.lower()} needs a chat or completion model.")

    def simulate(self, explanation: str, records: Sequence[ActivationRecord]) -> SimulationResult:
        raise UserError(f"{type(self).__name__.lower()} answers for whole excerpts, not per token: "
                        "use it as a judge (+simulator@judges.NAME=...), with a simulator for the "
                        "per-token simulation and scoring.calibrate=false.")

    def items(self, top: Sequence[ActivationRecord], random_: Sequence[ActivationRecord],
              quantile: Sequence[ActivationRecord] = ()) -> list[Item]:
        """The questions about these excerpts; an item's ``excerpt`` indexes ``top + random_ +
        quantile``."""
        raise NotImplementedError

    def cut(self, top: Sequence[ActivationRecord]) -> float:
        """The activation above which a token counts as activating: ``threshold`` times the
        largest activation of the top excerpts."""
        return self.threshold * max((max(r.activations, default=0.0) for r in top), default=0.0)

    def block(self, explanation: str, excerpts: Sequence[str]) -> str:
        lines = [f"Description: {explanation.strip()}"]
        lines += [f"Excerpt {i + 1}: {text}" for i, text in enumerate(excerpts)]
        return "\n".join(lines)

    def request(self, explanation: str, chunk: Sequence[Item]) -> GenerateRequest:
        """Chat: instructions and the example as the system message, the excerpts as the user's.
        Completion: all of it as one text that ends with the answer's opening "["."""
        caps, n = self.backend.capabilities, len(chunk)
        shots = [self.EXAMPLE[1][i % len(self.EXAMPLE[1])] for i in range(n)]   # as many as asked
        shot = (f"{self.block(self.EXAMPLE[0], [t for t, _ in shots])}\n{CUE.format(n=n)}"
                f"{', '.join(str(a) for _, a in shots)}]")
        target = self.block(explanation, [item.shown for item in chunk])
        logprobs = self.top_logprobs if caps.output_logprobs else 0
        if caps.chat and not caps.completion:
            return GenerateRequest(messages=(Message("system", f"{self.INSTRUCTIONS}\n\nFor example:\n{shot}"),
                                             Message("user", f"{target}\n\n{ASK.format(n=n)}")),
                                   max_tokens=3 * n + 16, top_logprobs=logprobs)
        return GenerateRequest(prompt=f"{self.INSTRUCTIONS}\n\n{shot}\n\n{target}\n{CUE.format(n=n)}",
                               max_tokens=4 * n + 8, top_logprobs=logprobs, stop=("]",))

    def parse(self, completion: Completion, n: int, prefilled: bool) -> tuple[list[int], list[float | None]]:
        values = parse_json(completion, n, prefilled)
        if any(v not in (0, 1) for v in values):
            raise Unreadable("the list holds numbers other than 0 and 1")
        return list(values), answer_probabilities(completion, n)

    def score(self, explanation: str, top: Sequence[ActivationRecord],
              random_: Sequence[ActivationRecord], quantile: Sequence[ActivationRecord] = ()) -> Scored:
        """Predictions and scores aligned with ``top + random_ + quantile``; the scores of
        ``all`` count all three, and ``quantile`` gets its own where any is given."""
        items = self.items(top, random_, quantile)
        order = list(range(len(items)))
        # classes interleaved in an order drawn from the seed and the excerpts themselves: the same
        # for every call on them, different between neurons, so that the labels' pattern is not the
        # example's (a model that copies the example's answers scores chance on average)
        random.Random(f"{self.seed}\n" + "\n".join(item.shown for item in items)).shuffle(order)
        answers: dict[int, tuple[int, float | None]] = {}
        failures: list[Failure] = []
        usage = Usage()
        prefilled = not (self.backend.capabilities.chat and not self.backend.capabilities.completion)
        for start in range(0, len(order), self.per_prompt):
            chunk = order[start:start + self.per_prompt]
            parse = lambda c, n=len(chunk): self.parse(c, n, prefilled)   # noqa: E731
            try:
                generation = generate_checked(self.backend, self.request(explanation, [items[i] for i in chunk]),
                                              parse)
                usage = usage + generation.usage   # a failed answer's tokens count too
                labels, probs = parse(first(generation))
            except (Unreadable, TransientError, Unscorable) as e:   # a BackendError is fatal
                failures += [Failure(x, failure_kind(e), str(e))
                             for x in sorted({items[i].excerpt for i in chunk})]
                continue
            answers.update({i: (label, p) for i, label, p in zip(chunk, labels, probs)})
        failed = {f.excerpt for f in failures}
        offset = len(top) + len(random_)
        n_records = offset + len(quantile)
        predictions: list[list[dict] | None] = [[] for _ in range(n_records)]
        for i, item in enumerate(items):
            if item.excerpt in failed:
                predictions[item.excerpt] = None
            elif predictions[item.excerpt] is not None:
                label, p = answers[i]
                predictions[item.excerpt].append({"label": item.label, "answer": label,
                                                  "p": None if p is None else round(p, 4)})
        expected = tuple(None if ps is None else tuple(float(p["answer"] if p["p"] is None else p["p"])
                                                       for p in ps)
                         for ps in predictions)
        if failures:
            log.warning("%s failed for %d of %d excerpts; first: %s", type(self).__name__,
                        len(failed), n_records, failures[0])
        scores = {}
        parts = [("top", lambda x: x < len(top)), ("random", lambda x: len(top) <= x < offset),
                 ("all", lambda x: True)]
        if quantile:
            parts.append(("quantile", lambda x: x >= offset))
        for split, keep in parts:
            asked = [(item, answers[i]) for i, item in enumerate(items)
                     if keep(item.excerpt) and item.excerpt not in failed]
            scores[split] = binary_scores([it.label for it, _ in asked], [a for _, (a, _) in asked],
                                          [p for _, (_, p) in asked])
        result = SimulationResult(expected, (), tuple(failures), usage)
        return Scored(result, scores, self.metric, tuple(None if p is None else tuple(p) for p in predictions))
