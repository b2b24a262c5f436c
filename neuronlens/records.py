"""The data model: neurons, activation records, and their JSON form.

Field names follow OpenAI's public neuron-explainer dataset, so their files load here and ours
load there: a `NeuronRecord` serialises to `{"dataclass_name": "NeuronRecord", "neuron_id":
{"layer_index", "neuron_index"}, "random_sample", "random_sample_by_quantile",
"quantile_boundaries", "mean", "variance", "skewness", "kurtosis",
"most_positive_activation_records"}`.

Splits are a property of an excerpt, not of a neuron: an excerpt's split is a hash of its tokens,
so the same text lands in the same split wherever it appears (as a top excerpt of one neuron or a
random excerpt of another), and no excerpt is ever both shown to the explainer and scored.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuronlens.files import dumps, write_atomic

SPLITS = ("train", "calibration", "valid", "test")
RANDOM_SPLITS = SPLITS[1:]   # random excerpts are never shown to an explainer
DEFAULT_FRACTIONS = {"train": 0.4, "calibration": 0.1, "valid": 0.2, "test": 0.3}


@dataclass(frozen=True, order=True)
class NeuronId:
    layer: int
    index: int

    def to_json(self) -> dict[str, Any]:
        return {"dataclass_name": "NeuronId", "layer_index": self.layer, "neuron_index": self.index}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NeuronId:
        return cls(int(d["layer_index"]), int(d["neuron_index"]))

    def __str__(self) -> str:
        return f"L{self.layer}/N{self.index}"


@dataclass
class ActivationRecord:
    """One excerpt: its tokens (as text) and the neuron's activation at each."""

    tokens: list[str]
    activations: list[float]
    # How each token reads, where the recording knows better than its text alone: a character
    # split into byte tokens (each "\ufffd" alone) whole on its first token, "" on the others.
    # For display only; not part of the JSON form (OpenAI's has no such field).
    text: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.activations):
            raise ValueError(
                f"An activation record has {len(self.tokens)} tokens but "
                f"{len(self.activations)} activations; they must match one to one."
            )

    @property
    def max_activation(self) -> float:
        return max(self.activations) if self.activations else 0.0

    def key(self) -> str:
        """A stable content hash of the tokens (identifies the excerpt, not the neuron)."""
        return hashlib.sha256("\x1f".join(self.tokens).encode("utf-8")).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"dataclass_name": "ActivationRecord", "tokens": self.tokens,
                "activations": self.activations}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ActivationRecord:
        return cls(list(d["tokens"]), [float(a) for a in d["activations"]])


def split_of(record: ActivationRecord, seed: int = 0,
             fractions: dict[str, float] | None = None) -> str:
    """The split an excerpt belongs to: deterministic in (tokens, seed), disjoint by construction."""
    fractions = fractions or DEFAULT_FRACTIONS
    total = sum(fractions.values())
    digest = hashlib.sha256(f"{seed}\x1e{record.key()}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64 * total
    acc = 0.0
    for name in SPLITS:
        acc += fractions.get(name, 0.0)
        if u < acc:
            return name
    return SPLITS[-1]


def interleaved(records: list[ActivationRecord], splits: tuple[str, ...], per_split: int
                ) -> dict[str, list[ActivationRecord]]:
    """OpenAI's reference splits: record ``i`` of the first ``per_split * len(splits)`` goes to
    ``splits[i % len(splits)]`` (equal, interleaved slices of a list sorted by activation)."""
    return {name: records[k:per_split * len(splits):len(splits)] for k, name in enumerate(splits)}


@dataclass
class Split:
    """The excerpts of one neuron that fall in one split."""

    top: list[ActivationRecord]
    random: list[ActivationRecord]
    # the neuron's quantile samples (``recording.quantiles``) that fall in this split and are not
    # also one of its top or random excerpts: random excerpts drawn by bins of their max (hash
    # splits only; the reference's interleaved splits have none)
    quantile: list[ActivationRecord] = field(default_factory=list)

    @property
    def all(self) -> list[ActivationRecord]:
        return self.top + self.random


@dataclass
class NeuronRecord:
    """What a neuron responds to: its top excerpts, random excerpts and activation statistics."""

    neuron_id: NeuronId
    most_positive_activation_records: list[ActivationRecord] = field(default_factory=list)
    random_sample: list[ActivationRecord] = field(default_factory=list)
    random_sample_by_quantile: list[list[ActivationRecord]] | None = None
    quantile_boundaries: list[float] | None = None
    mean: float | None = math.nan
    variance: float | None = math.nan
    skewness: float | None = math.nan
    kurtosis: float | None = math.nan
    # "hash": each excerpt's split from a hash of its tokens (any source, robust to reordering);
    # "openai": the reference's interleaved slices, top and random 1:1 (records in OpenAI's order)
    split_scheme: str = field(default="hash", compare=False)
    # the tokens the neuron's output promotes and suppresses (``subject/logits.py``), if known
    logits: dict | None = field(default=None, compare=False)
    density: float | None = field(default=None, compare=False)   # fraction of tokens with a > 0

    @property
    def max_activation(self) -> float:
        recs = self.most_positive_activation_records or self.random_sample
        return max((r.max_activation for r in recs), default=0.0)

    def split(self, name: str, seed: int = 0,
              fractions: dict[str, float] | None = None) -> Split:
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}; choose one of {', '.join(SPLITS)}.")
        if self.split_scheme == "openai":
            top, rnd = self.most_positive_activation_records, self.random_sample
            n = min(len(top) // len(SPLITS), len(rnd) // len(RANDOM_SPLITS))   # 1:1 in every split
            if n == 0:   # too few random excerpts for 1:1: the top ones alone, as the reference would
                n = len(top) // len(SPLITS)
            return Split(interleaved(top, SPLITS, n)[name],
                         interleaved(rnd, RANDOM_SPLITS, n).get(name, []))
        top = [r for r in self.most_positive_activation_records
               if split_of(r, seed, fractions) == name]
        rnd = [r for r in self.random_sample if split_of(r, seed, fractions) == name]
        return Split(top, rnd, self.quantile_split(name, seed, fractions))

    def quantile_split(self, name: str, seed: int = 0,
                       fractions: dict[str, float] | None = None) -> list[ActivationRecord]:
        """The quantile samples of split ``name`` (by the same hash as every excerpt), each once,
        leaving out those that are also a top or random excerpt (already in their own split)."""
        seen = {r.key() for r in (*self.most_positive_activation_records, *self.random_sample)}
        out = []
        for r in (r for q in self.random_sample_by_quantile or () for r in q):
            if r.key() not in seen and split_of(r, seed, fractions) == name:
                seen.add(r.key())
                out.append(r)
        return out

    def shown(self, seed: int = 0) -> list[ActivationRecord]:
        """The excerpts an explainer may see: the train split's top excerpts, or, with none there,
        its random excerpts strongest first (never an excerpt of another split)."""
        train = self.split("train", seed)
        return train.top or sorted(train.random, key=lambda r: -r.max_activation)

    def to_json(self) -> dict[str, Any]:
        quantiles = (None if self.random_sample_by_quantile is None else
                     [[r.to_json() for r in q] for q in self.random_sample_by_quantile])
        return {
            "dataclass_name": "NeuronRecord",
            "neuron_id": self.neuron_id.to_json(),
            "random_sample": [r.to_json() for r in self.random_sample],
            "random_sample_by_quantile": quantiles,
            "quantile_boundaries": self.quantile_boundaries,
            "mean": self.mean,
            "variance": self.variance,
            "skewness": self.skewness,
            "kurtosis": self.kurtosis,
            "most_positive_activation_records": [
                r.to_json() for r in self.most_positive_activation_records],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NeuronRecord:
        quantiles = d.get("random_sample_by_quantile")
        return cls(
            neuron_id=NeuronId.from_json(d["neuron_id"]),
            most_positive_activation_records=[
                ActivationRecord.from_json(r) for r in d.get("most_positive_activation_records", [])],
            random_sample=[ActivationRecord.from_json(r) for r in d.get("random_sample", [])],
            random_sample_by_quantile=(None if quantiles is None else
                                       [[ActivationRecord.from_json(r) for r in q]
                                        for q in quantiles]),
            quantile_boundaries=d.get("quantile_boundaries"),
            mean=_number(d.get("mean")),
            variance=_number(d.get("variance")),
            skewness=_number(d.get("skewness")),
            kurtosis=_number(d.get("kurtosis")),
        )

    def save(self, path: str | Path) -> None:
        write_atomic(path, dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> NeuronRecord:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{path} is not a NeuronRecord JSON file ({e!r}).") from e


def _number(value: Any) -> float:
    """A statistic from JSON: null (how strict JSON writes NaN) is NaN."""
    return math.nan if value is None else float(value)
