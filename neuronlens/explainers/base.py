"""What every explainer is: a neuron's id and its train excerpts in, candidate explanations out.

An explainer never sees a neuron's calibration, valid or test excerpts, nor anything else of its
record but one thing: the id names the neuron (for explainers that look it up, such as loaded
explanations or a synthetic rule's truth), the excerpts show what it responds to, and, with
``explain.show_logits``, ``LLMExplainer.outputs`` holds its output logits (from the weights,
never from an excerpt). ``prepare`` is called once per run
with every neuron's train excerpts, for explainers that work across neurons (the shuffled
baseline gives each neuron another's explanation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from neuronlens.records import ActivationRecord, NeuronId


@dataclass(frozen=True)
class ExplanationResult:
    explanations: tuple[str, ...]     # parsed, non-empty, deduplicated in order
    n_failed: int = 0                 # completions that parsed to nothing
    prompt_tokens: int = 0
    completion_tokens: int = 0
    n_records_shown: int = 0
    n_fewshot_used: int = 0
    n_records_dropped: int = 0        # excerpts left out to fit the context
    n_fewshot_dropped: int = 0        # few-shot examples left out to fit the context
    n_lines_truncated: int = 0        # token lines cut from the one excerpt left, to fit
    n_copies_replaced: int = 0        # answers that copied a few-shot answer, asked again without it


@runtime_checkable
class Explainer(Protocol):
    """Subclass it (or match it): ``explain`` is the one method to write."""

    backend = None   # the LLM backend behind it, if any: the run reports its requests and cost

    def prepare(self, train: Mapping[NeuronId, Sequence[ActivationRecord]]) -> None:
        """Called once before the first ``explain``, with the train excerpts of every neuron."""

    def explain(self, neuron: NeuronId, train: Sequence[ActivationRecord]) -> ExplanationResult:
        """Candidate explanations of ``neuron`` from its train excerpts (most active first)."""
        ...
