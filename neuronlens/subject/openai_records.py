"""A subject made of neuron records in OpenAI's published format, read instead of recorded.

``subject.path`` is a local folder laid out ``{layer}/{neuron}.json`` (as OpenAI's
``collated-activations`` dataset, or ``Recording.export_openai``), or the URL of such a folder
(``https://openaipublic.blob.core.windows.net/neuron-explainer/data/collated-activations/``). No
model is loaded: the pipeline explains, simulates and scores straight from the records.

A local folder offers the neurons found in it; ``neurons.layers`` (and ``which=list`` +
``neurons.indices``) keep some of them. A URL cannot be listed, so it needs ``neurons.layers`` and
``which=list`` + ``neurons.indices``; the files are downloaded once into ``{run_dir}/records``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from neuronlens.corpus import Corpus
from neuronlens.errors import UserError
from neuronlens.files import write_atomic
from neuronlens.records import NeuronId, NeuronRecord
from neuronlens.files import fetch_text, is_url
from neuronlens.subject.base import Subject, pick

log = logging.getLogger(__name__)

def parse_record(text: str, source: str) -> NeuronRecord:
    """One OpenAI-format NeuronRecord from its JSON text; a malformed file is a UserError."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("dataclass_name", "NeuronRecord") != "NeuronRecord":
            raise ValueError("not a NeuronRecord object")
        return NeuronRecord.from_json(data)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{source} is not an OpenAI-format NeuronRecord JSON file ({e}).") from e


class OpenAIRecordsSubject(Subject):
    """Neuron records read from ``path`` (a folder or URL laid out ``{layer}/{neuron}.json``).

    ``device`` is not used here; the local explainer and simulator backends read it
    (``${subject.device}``), as they do for a model subject."""

    default_splits = "openai"   # scoring.splits=auto: the reference's interleaved slices

    def __init__(self, path: str, device: str = "auto", name: str | None = None):
        if not path or path == "???":
            raise UserError("subject=openai_records needs subject.path=<folder or URL laid out "
                            "{layer}/{neuron}.json>.")
        self.path, self.device = str(path), device
        self.name = name or f"openai_records:{self.path.rstrip('/')}"

    def available(self) -> list[NeuronId]:
        """The neurons in a local folder: every ``{layer}/{neuron}.json`` with numeric names."""
        root = Path(self.path).expanduser()
        if not root.is_dir():
            raise UserError(f"subject.path={self.path} is not a folder; give a folder laid out "
                            "{layer}/{neuron}.json, or an http(s) URL of one.")
        found = sorted(NeuronId(int(f.parent.name), int(f.stem)) for f in root.glob("*/*.json")
                       if f.parent.name.isdigit() and f.stem.isdigit())
        if not found:
            raise UserError(f"{root} holds no neuron records laid out {{layer}}/{{neuron}}.json.")
        return found

    def select(self, neurons: DictConfig, seed: int) -> list[NeuronId]:
        if not is_url(self.path):
            return pick(self.available(), neurons)
        layers, indices = neurons.get("layers"), neurons.get("indices")
        if not layers or neurons.get("which") != "list" or not indices:
            raise UserError("Records read from a URL cannot be listed: name the neurons with "
                            "neurons.layers=[..] neurons.which=list neurons.indices=[..].")
        return [NeuronId(int(l), int(i)) for l in dict.fromkeys(layers)
                for i in dict.fromkeys(indices)]

    def records(self, neurons: list[NeuronId], corpus: Corpus | None = None,
                recording: DictConfig | None = None, seed: int = 0, run_dir: Path | None = None,
                progress: bool = False) -> list[NeuronRecord]:
        """The records read from ``path`` (a URL's downloaded into ``run_dir/records``); nothing
        is recorded, so the corpus and the recording settings are not used."""
        return [self.load(n, run_dir) for n in neurons]

    def load(self, neuron: NeuronId, run_dir: Path | None = None) -> NeuronRecord:
        relative = f"{neuron.layer}/{neuron.index}.json"
        if is_url(self.path):
            local = Path(run_dir) / "records" / relative if run_dir is not None else None
            if local is not None and local.is_file():
                text, source = local.read_text(encoding="utf-8"), str(local)
            else:
                source = f"{self.path.rstrip('/')}/{relative}"
                text = fetch_text(source, f"the record of {neuron}")
                if local is not None:
                    local.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(local, text)
        else:
            file = Path(self.path).expanduser() / relative
            if not file.is_file():
                raise UserError(f"There is no record of {neuron} at {file}.")
            text, source = file.read_text(encoding="utf-8"), str(file)
        record = parse_record(text, source)
        if record.neuron_id != neuron:
            raise UserError(f"{source} holds the record of {record.neuron_id}, not of {neuron}.")
        record = usable_excerpts(record, source)
        if not record.most_positive_activation_records and not record.random_sample:
            raise UserError(f"{source} has no usable activation records.")
        return record


def usable_excerpts(record: NeuronRecord, source: str) -> NeuronRecord:
    """``record`` without the excerpts that cannot be explained or scored (no tokens, or an
    activation that is NaN or infinite), each kind of drop said in one warning line."""
    def why(r) -> str | None:
        if not r.tokens:
            return "no tokens"
        if not all(math.isfinite(a) for a in r.activations):
            return "a NaN or infinite activation"
        return None

    dropped: Counter[str] = Counter()
    kept = {}
    for field in ("most_positive_activation_records", "random_sample"):
        kept[field] = []
        for r in getattr(record, field):
            reason = why(r)
            if reason:
                dropped[reason] += 1
            else:
                kept[field].append(r)
    for reason, n in dropped.items():
        log.warning("%s: %d excerpts dropped (%s)", source, n, reason)
    return dataclasses.replace(record, **kept) if dropped else record
