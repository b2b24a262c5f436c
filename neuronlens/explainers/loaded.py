"""An explainer that reads explanations from a file instead of asking an LLM (``explainer=load``):
the way to re-score published explanations with another simulator.

``explainer.path`` is one of
- a CSV with a header naming the columns ``layer``, ``index`` (or ``neuron``) and ``explanation``;
- a JSONL file whose lines are ``{"layer", "index", "explanation"}`` objects (a run's
  ``neurons.jsonl`` is one) or OpenAI ``NeuronSimulationResults`` objects (``neuron_id`` +
  ``scored_explanations``);
- a folder, or the URL of one, laid out ``{layer}/{neuron}.jsonl`` as OpenAI's published
  explanations (``https://openaipublic.blob.core.windows.net/neuron-explainer/data/explanations/``),
  read one neuron at a time.

Every distinct explanation of a neuron is a candidate; with more than one, the pipeline keeps the
best on the `valid` split. A neuron with none is a failed row ("no explanation for L5/N131 in ...").
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from neuronlens.backends.base import TransientError
from neuronlens.errors import UserError
from neuronlens.explainers.base import Explainer, ExplanationResult
from neuronlens.files import fetch_text, is_url, json_lines
from neuronlens.records import ActivationRecord, NeuronId


class MissingExplanation(TransientError):
    """The file has no explanation for this neuron. The pipeline records it as that neuron's
    failure (as it does an explainer that still fails after retries) and goes on."""


def explanations_of(obj: Any, where: str) -> list[tuple[NeuronId, str]]:
    """The ``(neuron, explanation)`` pairs in one JSON object of either shape."""
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a JSON object.")
    try:
        if "scored_explanations" in obj or obj.get("dataclass_name") == "NeuronSimulationResults":
            neuron = NeuronId.from_json(obj["neuron_id"])
            return [(neuron, _text(e["explanation"], where)) for e in obj["scored_explanations"]
                    if e.get("explanation") is not None]
        neuron = NeuronId(int(obj["layer"]), int(obj["index"] if "index" in obj else obj["neuron"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{where} has neither layer/index/explanation nor OpenAI's neuron_id/"
                        f"scored_explanations ({type(e).__name__}: {e}).") from e
    if "explanation" not in obj:
        raise UserError(f"{where} has no explanation field.")
    return [] if obj["explanation"] is None else [(neuron, _text(obj["explanation"], where))]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where} has an explanation that is not a string: {value!r}.")
    return " ".join(value.split())


def read_jsonl(lines: Iterable[str], source: str) -> list[tuple[NeuronId, str]]:
    pairs = []
    for n, obj in json_lines(lines, source):
        pairs += explanations_of(obj, f"{source} line {n}")
    return pairs


def read_csv(path: Path) -> list[tuple[NeuronId, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        column = "index" if "index" in fields else "neuron"
        if not {"layer", column, "explanation"} <= fields:
            raise UserError(f"{path} needs a header row with the columns layer, index and "
                            f"explanation (it has {', '.join(sorted(fields)) or 'none'}).")
        pairs = []
        for n, row in enumerate(reader, 2):
            try:
                neuron = NeuronId(int(row["layer"]), int(row[column]))
            except (TypeError, ValueError):
                raise UserError(f"{path} line {n}: layer and index must be whole numbers "
                                f"(got {row['layer']!r}, {row[column]!r}).") from None
            if (row["explanation"] or "").strip():
                pairs.append((neuron, _text(row["explanation"], f"{path} line {n}")))
        return pairs


class LoadedExplainer(Explainer):
    """Explanations read from ``path`` (see the module docstring for the formats)."""

    def __init__(self, path: str):
        if not path:
            raise UserError("explainer=load needs explainer.path=<CSV, JSONL, or folder of "
                            "{layer}/{neuron}.jsonl>.")
        self.path = str(path)
        self.folder = is_url(self.path) or Path(self.path).expanduser().is_dir()
        self.table: dict[NeuronId, list[str]] = {}
        if self.folder:
            return
        file = Path(self.path).expanduser()
        if not file.is_file():
            raise UserError(f"explainer.path={self.path} does not exist; give a CSV or JSONL file "
                            "of explanations, or a folder laid out {layer}/{neuron}.jsonl.")
        if file.suffix.lower() == ".csv":
            pairs = read_csv(file)
        else:
            pairs = read_jsonl(file.read_text(encoding="utf-8").splitlines(), str(file))
        for neuron, text in pairs:
            self.table.setdefault(neuron, [])
            if text and text not in self.table[neuron]:
                self.table[neuron].append(text)
        if not self.table:
            raise UserError(f"{file} holds no explanations.")

    def lookup(self, neuron: NeuronId) -> list[str]:
        if not self.folder:
            return self.table.get(neuron, [])
        relative = f"{neuron.layer}/{neuron.index}.jsonl"
        if is_url(self.path):
            source = f"{self.path.rstrip('/')}/{relative}"
            text = fetch_text(source, f"the explanations of {neuron}", missing_ok=True)
        else:
            file = Path(self.path).expanduser() / relative
            source, text = str(file), file.read_text(encoding="utf-8") if file.is_file() else None
        if text is None:
            return []
        return list(dict.fromkeys(t for n, t in read_jsonl(text.splitlines(), source)
                                  if n == neuron and t))

    def explain(self, neuron: NeuronId, records: Sequence[ActivationRecord]) -> ExplanationResult:
        texts = self.lookup(neuron)
        if not texts:
            raise MissingExplanation(f"no explanation for {neuron} in {self.path}")
        return ExplanationResult(explanations=tuple(texts))
