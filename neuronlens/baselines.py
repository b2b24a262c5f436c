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
from collections.abc import Sequence

from neuronlens.errors import UserError
from neuronlens.explain import ExplanationResult, format_token
from neuronlens.records import ActivationRecord, NeuronId, NeuronRecord


def _result(*explanations: str) -> ExplanationResult:
    return ExplanationResult(explanations=tuple(e for e in explanations if e), n_failed=0,
                             prompt_tokens=0, completion_tokens=0, n_records_shown=0,
                             n_fewshot_used=0)


class TopTokens:
    """``the tokens "a", "b", "c"``: the ``n`` tokens (stripped, lower-cased) with the highest mean
    activation over their occurrences in the shown excerpts, among those seen at least
    ``min_count`` times (when any are)."""

    def __init__(self, n: int = 5, min_count: int = 2):
        if n < 1:
            raise UserError(f"explainer.n must be at least 1 for top_tokens, got {n}.")
        self.n, self.min_count = n, min_count

    def explain(self, records: Sequence[ActivationRecord],
                neuron: NeuronRecord | None = None) -> ExplanationResult:
        seen: dict[str, list[float]] = defaultdict(list)
        for r in records:
            for tok, act in zip(r.tokens, r.activations):
                if tok.strip():
                    seen[tok.strip().lower()].append(act)
        frequent = {t: a for t, a in seen.items() if len(a) >= self.min_count} or seen
        ranked = sorted(frequent, key=lambda t: (-sum(frequent[t]) / len(frequent[t]), t))
        top = [t for t in ranked if sum(frequent[t]) > 0][: self.n]
        if not top:
            return _result()
        return _result("the tokens " + ", ".join(f'"{format_token(t)}"' for t in top))


class Shuffled:
    """Each neuron gets the explanation ``inner`` gives another neuron: neurons are put in a seeded
    random cycle, and each takes its successor's explanation (no neuron keeps its own)."""

    def __init__(self, inner, seed: int = 0):
        self.inner, self.seed = inner, seed
        self.partner: dict[NeuronId, NeuronRecord] = {}
        self.split_seed = 0

    def prepare(self, records: Sequence[NeuronRecord], split_seed: int) -> None:
        if len(records) < 2:
            raise UserError("explainer=shuffled needs at least two neurons to swap explanations "
                            "between; raise neurons.per_layer.")
        if hasattr(self.inner, "prepare"):
            self.inner.prepare(records, split_seed)
        cycle = sorted(records, key=lambda r: r.neuron_id)
        random.Random(self.seed).shuffle(cycle)
        self.partner = {r.neuron_id: cycle[(i + 1) % len(cycle)] for i, r in enumerate(cycle)}
        self.split_seed = split_seed

    def explain(self, records: Sequence[ActivationRecord],
                neuron: NeuronRecord | None = None) -> ExplanationResult:
        if neuron is None or neuron.neuron_id not in self.partner:
            raise UserError("explainer=shuffled explains only the neurons of the run it was "
                            "prepared for.")
        other = self.partner[neuron.neuron_id]
        return self.inner.explain(other.shown(self.split_seed), neuron=other)

    @property
    def backend(self):  # the inner LLM's backend, for the run's token and cost accounting
        return getattr(self.inner, "backend", None)


class Truth:
    """The true explanation of a synthetic neuron (``subject=synthetic`` only)."""

    def __init__(self, rules: Sequence[dict] | None = None):
        self.rules = list(rules or [])

    def prepare(self, records: Sequence[NeuronRecord], split_seed: int) -> None:
        if not self.rules:
            raise UserError("explainer=truth needs subject=synthetic, whose neurons have known "
                            "explanations.")
        for r in records:
            if r.neuron_id.index >= len(self.rules):
                raise UserError(f"explainer=truth has no rule for neuron {r.neuron_id}.")

    def explain(self, records: Sequence[ActivationRecord],
                neuron: NeuronRecord | None = None) -> ExplanationResult:
        if neuron is None:
            raise UserError("explainer=truth needs the neuron, not only its excerpts.")
        return _result(self.rules[neuron.neuron_id.index]["explanation"])
