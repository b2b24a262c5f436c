"""What a subject is: whatever yields the records of the neurons to explain.

A subject config (``conf/subject/*.yaml``) instantiates a ``Subject``: a transformers
model that is recorded over the corpus (``ModelSubject``), rule-defined synthetic neurons with
known answers (``SyntheticSubject``), or records read from files. The pipeline asks it four
things: whether the ``neurons`` settings can work (``check``, from files alone, before anything
loads), which neurons they pick (``select``), their records (``records``: recorded over a corpus
with the run's ``recording`` settings, or read), and how its records are split by default
(``default_splits``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from neuronlens.corpus import Corpus
from neuronlens.errors import UserError
from neuronlens.records import NeuronId, NeuronRecord


class Subject(Protocol):
    name: str  # what the summary and the report call it
    # how ``scoring.splits=auto`` splits its records: ``hash`` (by each excerpt's tokens) or
    # ``openai`` (the reference's interleaved slices, for records from OpenAI's dataset)
    default_splits: str = "hash"

    def check(self, neurons: DictConfig) -> None:
        """Fail in one line, before anything loads, when the settings cannot work (a layer the
        model does not have, say)."""

    def select(self, neurons: DictConfig, seed: int) -> list[NeuronId]: ...

    def records(self, neurons: list[NeuronId], corpus: Corpus, recording: DictConfig, seed: int,
                run_dir: Path, progress: bool = False) -> list[NeuronRecord]:
        """The records of ``neurons``, kept in ``run_dir``: recorded over ``corpus`` with the
        ``recording`` settings (``window``, ``max_windows``, ``top_k``, ``n_random``,
        ``batch_size``, ``cache``) and ``seed`` (the random excerpts), or read from elsewhere."""
        ...


def pick(available: list[NeuronId], neurons: DictConfig | dict[str, Any]) -> list[NeuronId]:
    """The neurons of a fixed set (synthetic rules, records on disk) that the settings keep:
    ``neurons.layers`` (null = all) and, with ``which=list``, ``neurons.indices``; ``per_layer``
    and ``which=random|first`` do not thin a fixed set."""
    layers, which, indices = neurons.get("layers"), neurons.get("which"), neurons.get("indices")
    chosen = [n for n in available if layers is None or n.layer in set(layers)]
    if which == "list":
        if not indices:
            raise UserError("neurons.which=list needs neurons.indices=[...].")
        chosen = [n for n in chosen if n.index in {int(i) for i in indices}]
    if not chosen:
        have = sorted({n.layer for n in available})
        raise UserError(f"No neuron matches neurons.layers={layers} and neurons.indices="
                        f"{list(indices or [])}; this subject has layers {have}.")
    return chosen
