"""Explainers with no LLM, which every LLM explainer is measured against.

- ``TopTokens`` (``explainer=top_tokens``), the floor: the tokens with the highest mean activation
  in the excerpts shown. An LLM that cannot beat a list of tokens adds nothing.
- ``Shuffled`` (``explainer=shuffled``), the sanity check: each neuron gets another neuron's
  explanation (from an inner explainer, the local LLM by default). A judge that scores these as
  well as the real ones cannot tell explanations apart.
- ``Truth`` (``explainer=truth``), the ceiling on synthetic neurons: the rule's own explanation.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence

from neuronlens.errors import UserError
from neuronlens.explainers.base import Explainer, ExplanationResult
from neuronlens.prompt_format import format_token
from neuronlens.records import ActivationRecord, NeuronId


class TopTokens(Explainer):
    """``the tokens "a", "b", "c"``: the ``n`` tokens (stripped, lower-cased; a character split into
    byte tokens counts as one) with the highest mean activation over their occurrences in the shown
    excerpts, among those seen at least ``min_count`` times (when any are)."""

    def __init__(self, n: int = 5, min_count: int = 2):
        if n < 1:
            raise UserError(f"explainer.n must be at least 1 for top_tokens, got {n}.")
        self.n, self.min_count = n, min_count

    def explain(self, neuron: NeuronId, records: Sequence[ActivationRecord]) -> ExplanationResult:
        seen: dict[str, list[float]] = defaultdict(list)
        for r in records:
            # a character split into byte tokens reads whole on its first token ("" on the rest);
            # a lone byte token ("\ufffd") names nothing
            for tok, act in zip(r.text or r.tokens, r.activations):
                if tok.strip() and tok.strip("\ufffd").strip():
                    seen[tok.strip().lower()].append(act)
        frequent = {t: a for t, a in seen.items() if len(a) >= self.min_count} or seen
        ranked = sorted(frequent, key=lambda t: (-sum(frequent[t]) / len(frequent[t]), t))
        top = [t for t in ranked if sum(frequent[t]) > 0][: self.n]
        if not top:
            return ExplanationResult(explanations=())
        return ExplanationResult(explanations=("the tokens " + ", ".join(f'"{format_token(t)}"' for t in top),))


class Shuffled(Explainer):
    """Each neuron gets the explanation ``inner`` gives another neuron: neurons are put in a seeded
    random cycle, and each takes its successor's explanation (no neuron keeps its own)."""

    def __init__(self, inner, seed: int = 0):
        self.inner, self.seed = inner, seed
        self.partner: dict[NeuronId, NeuronId] = {}
        self.train: Mapping[NeuronId, Sequence[ActivationRecord]] = {}

    def prepare(self, train: Mapping[NeuronId, Sequence[ActivationRecord]]) -> None:
        if len(train) < 2:
            raise UserError("explainer=shuffled needs at least two neurons to swap explanations "
                            "between; raise neurons.per_layer.")
        self.inner.prepare(train)
        cycle = sorted(train)
        random.Random(self.seed).shuffle(cycle)
        self.partner = {n: cycle[(i + 1) % len(cycle)] for i, n in enumerate(cycle)}
        self.train = train

    def explain(self, neuron: NeuronId, records: Sequence[ActivationRecord]) -> ExplanationResult:
        if neuron not in self.partner:
            raise UserError("explainer=shuffled explains only the neurons of the run it was "
                            "prepared for.")
        other = self.partner[neuron]
        return self.inner.explain(other, self.train[other])

    @property
    def backend(self):  # the inner LLM's backend, for the run's token and cost accounting
        return self.inner.backend


class Truth(Explainer):
    """The true explanation of a synthetic neuron (``subject=synthetic`` only)."""

    def __init__(self, rules: Sequence[dict] | None = None):
        self.rules = list(rules or [])

    def prepare(self, train: Mapping[NeuronId, Sequence[ActivationRecord]]) -> None:
        if not self.rules:
            raise UserError("explainer=truth needs subject=synthetic, whose neurons have known "
                            "explanations.")
        for neuron in train:
            if neuron.index >= len(self.rules):
                raise UserError(f"explainer=truth has no rule for neuron {neuron}.")

    def explain(self, neuron: NeuronId, records: Sequence[ActivationRecord]) -> ExplanationResult:
        if neuron.index >= len(self.rules):
            raise UserError(f"explainer=truth has no rule for neuron {neuron}.")
        return ExplanationResult(explanations=(self.rules[neuron.index]["explanation"],))
