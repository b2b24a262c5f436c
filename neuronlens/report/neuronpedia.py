"""A run's units in the form Neuronpedia's upload takes (``neuronlens-report DIR --neuronpedia OUT``).

Neuronpedia groups features by model and *source*, ``<layer>-<source set>`` (``15-res-sm`` is
layer 15 of the source set ``res-sm``). Its upload endpoint (``POST /api/feature/upload-batch``,
as the ``neuronpedia`` package's ``FeatureRequest.upload_batch`` sends it) takes at most 128
features per request:

    {"modelId": ..., "source": ..., "features": [{"index", "density", "activations": [{"tokens",
     "values", "quantileMax", "quantileMin", "quantileFraction"}], "explanations": [{"text",
     "methodName", "modelName"}], "topLogits": [{"token", "value"}], "bottomLogits": [...]}]}

``export`` writes exactly those request bodies, one file per batch
(``OUT/<source>/batch-000.json``), and uploads nothing: create the source set and send each file
with the ``neuronpedia`` package (or curl) yourself. Activations are the unit's top excerpts from
the run's recording (every split: Neuronpedia shows what a unit does, not how it was scored);
explanations are the kept one, named for the run's explainer. Neuronpedia's upload has no field
for a score, so scores stay in ``neurons.jsonl``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from neuronlens.errors import UserError
from neuronlens.files import write_atomic
from neuronlens.report.runs import rows_of_run

MAX_FEATURES_PER_BATCH = 128   # the upload endpoint's limit
METHOD = "neuronlens"


def explainer_model(run_dir: Path) -> str | None:
    """The explainer's model as the run's saved config names it (None: not saved)."""
    config = run_dir / ".hydra" / "config.yaml"
    if not config.exists():
        return None
    explainer = (yaml.safe_load(config.read_text()) or {}).get("explainer") or {}
    return explainer.get("model") or (explainer.get("_target_") or "").rsplit(".", 1)[-1] or None


def features(run_dir: Path, top: int = 20) -> dict[int, list[dict[str, Any]]]:
    """Per layer, the run's finished units as Neuronpedia features (``top`` excerpts each)."""
    from neuronlens.subject.recording import Recording

    rows = {(r["layer"], r["index"]): r for r in rows_of_run(run_dir)}
    recording = Recording.saved(run_dir / "recording")
    if recording is None:
        raise UserError(f"{run_dir} has no recording (recording/manifest.json), so there are no "
                        "activations to export; a run of a model subject (subject=smollm2, sae, ...) "
                        "keeps one.")
    model = explainer_model(run_dir)
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for i, unit in enumerate(recording.neurons):
        row = rows.get((unit.layer, unit.index))
        if row is None:
            continue
        record = recording.neuron_record(i)
        logits = row.get("logits") or {}
        out[unit.layer].append({
            "index": unit.index,
            "density": row.get("density"),
            "activations": [{"tokens": list(r.text or r.tokens), "values": [round(a, 5) for a in r.activations],
                             "quantileMax": None, "quantileMin": None, "quantileFraction": None}
                            for r in record.most_positive_activation_records[:top]],
            "explanations": [] if not row.get("explanation") else
            [{"text": row["explanation"], "methodName": METHOD, "modelName": model}],
            "topLogits": [{"token": t, "value": v} for t, v in logits["promoted"]] if logits else None,
            "bottomLogits": [{"token": t, "value": v} for t, v in logits["suppressed"]] if logits else None,
        })
    return out


def export(run_dir: Path, out: Path, model_id: str, source_set: str, top: int = 20) -> list[Path]:
    """Write the upload requests of ``run_dir``'s units under ``out``; returns the files."""
    written = []
    for layer, feats in sorted(features(run_dir, top).items()):
        source = f"{layer}-{source_set}"
        for n, start in enumerate(range(0, len(feats), MAX_FEATURES_PER_BATCH)):
            path = out / source / f"batch-{n:03d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            body = {"modelId": model_id, "source": source,
                    "features": feats[start:start + MAX_FEATURES_PER_BATCH]}
            write_atomic(path, json.dumps(body, ensure_ascii=False, indent=1))
            written.append(path)
    return written
