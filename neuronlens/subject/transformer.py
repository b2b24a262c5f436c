"""The usual subject: a transformers causal LM, recorded over the corpus with hooks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from neuronlens.corpus import Corpus, token_windows
from neuronlens.errors import UserError
from neuronlens.records import NeuronId, NeuronRecord
from neuronlens.subject.base import Subject
import torch

from neuronlens.subject.hooks import (HookPoint, check_neuron, check_unit, hook_point,
                                      hook_point_from_config, n_layers, n_neurons)
from neuronlens.subject.logits import direction_logits, output_direction_weights
from neuronlens.models import cache_dir, display_name, load_model, resolve, weights_identity
from neuronlens.subject.recording import Recording, RecordingConfig, record, select

log = logging.getLogger(__name__)


class ModelSubject(Subject):
    """``subject.model``: an HF name, a local directory, a .gguf file, or an embedded model."""

    def __init__(self, model: str = "embedded", device: str = "auto", dtype: str = "auto"):
        self.model, self.device, self.dtype = model, device, dtype
        self.name = display_name(model)

    def check(self, neurons: DictConfig) -> None:
        """Layers and neuron indices against the model's config.json, before its weights load."""
        from transformers import AutoConfig

        path = resolve(self.model)   # an uncached hub name without a hub: its one line, now
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError):
            return   # loading the model says what is wrong, in its own words
        layers = neurons.get("layers")
        for layer in layers if layers is not None else [n_layers(config) // 2]:
            hook_point_from_config(config, layer)   # architecture, experts, layer: before loading
        if neurons.get("which") == "list":
            for index in neurons.get("indices") or ():
                check_neuron(config, index)

    def load(self):
        return load_model(self.model, self.device, self.dtype)

    def select(self, neurons: DictConfig, seed: int) -> list[NeuronId]:
        model, _ = self.load()
        return select_neurons(model, neurons.layers, neurons.per_layer, neurons.which,
                              neurons.indices, seed)

    def records(self, neurons: list[NeuronId], corpus: Corpus, recording: DictConfig, seed: int,
                run_dir: Path, progress: bool = False) -> list[NeuronRecord]:
        model, tokenizer = self.load()
        layers = sorted({n.layer for n in neurons})
        records = list(recording_for(self.model, model, tokenizer, neurons, corpus, recording, seed,
                                     run_dir, progress, self.points(model, layers),
                                     self.units()).neuron_records())
        for layer in layers:
            mine = [r for r in records if r.neuron_id.layer == layer]
            indices = [r.neuron_id.index for r in mine]
            directions = self.directions(model, layer, indices)
            if directions is None:
                continue
            logits = direction_logits(model, tokenizer, directions, indices)
            for r in mine:
                r.logits = logits[r.neuron_id.index]
        return records

    # What the units of a layer are. Here: its MLP neurons; an SAE subject reads its latents.
    def points(self, model, layers: list[int]) -> dict[int, HookPoint]:
        """Where each layer's units are read (and how they are encoded from what is read)."""
        return {layer: hook_point(model, layer) for layer in layers}

    def units(self) -> dict | None:
        """What the units depend on besides the model (for the recording cache's key)."""
        return None

    def directions(self, model, layer: int, indices: list[int]) -> torch.Tensor | None:
        """The units' output directions in the residual stream [units, hidden] (None: unknown)."""
        return output_direction_weights(model, hook_point(model, layer).module)[indices]


def select_neurons(model, layers, per_layer: int, which: str, indices, seed: int) -> list[NeuronId]:
    layers = list(dict.fromkeys(layers)) if layers is not None else [n_layers(model) // 2]
    for layer in layers:
        hook_point(model, layer)  # a clear error for an unsupported model or a bad layer
    return select_units({l: n_neurons(model) for l in layers}, layers, per_layer, which, indices, seed)


def select_units(widths: dict[int, int], layers: list[int], per_layer: int, which: str, indices,
                 seed: int, kind: str = "neurons") -> list[NeuronId]:
    """The units that ``neurons.*`` pick from ``layers``, each ``widths[layer]`` wide (``kind``:
    "neurons" or "latents", for the errors)."""
    if not layers:
        raise UserError("neurons.layers is empty; give at least one layer, or null for the default.")
    if which == "list":
        if not indices:
            raise UserError("neurons.which=list needs neurons.indices=[...].")
        for l in layers:
            for i in indices:
                check_unit(widths[l], l, i, kind == "latents")
        chosen = list(dict.fromkeys(int(i) for i in indices))
        return [NeuronId(l, i) for l in layers for i in chosen]
    if per_layer < 1:
        raise UserError(f"neurons.per_layer must be at least 1, got {per_layer}.")
    if which == "first":
        return [NeuronId(l, i) for l in layers for i in range(min(per_layer, widths[l]))]
    if which == "random":
        return [NeuronId(l, i) for l in layers
                for i in sorted(random.Random(f"{seed}/{l}").sample(range(widths[l]),
                                                                   min(per_layer, widths[l])))]
    raise UserError(f"neurons.which must be first, random or list, not {which!r}.")


def recording_for(model_name: str, model, tokenizer, neurons: list[NeuronId], corpus: Corpus,
                  recording: DictConfig, seed: int, run_dir: Path, progress: bool = False,
                  points: dict[int, HookPoint] | None = None, units: dict | None = None) -> Recording:
    """The recording of ``neurons`` of ``model`` (``model_name``: its ``subject.model``) over
    ``corpus`` with the ``recording`` settings, kept in ``run_dir``: the units read at
    ``points`` (default: the MLP neurons), which depend on ``units`` besides the model (an SAE's
    files, say). With ``recording.cache``,
    each layer is recorded once, every unit of it, and cached under a key of the weights, the
    corpus and the settings, not of the neurons: any later run or shard on any units of that
    layer selects its rows from the cache and runs no forward pass."""
    target = run_dir / "recording"
    if (saved := Recording.saved(target)) is not None:
        return saved
    rconf = RecordingConfig(top_k=recording.top_k, n_random=recording.n_random,
                            batch_size=recording.batch_size, seed=seed,
                            quantiles=recording.get("quantiles", 0), per_quantile=recording.get("per_quantile", 20))
    settings = {k: v for k, v in vars(rconf).items()   # without quantiles, the keys of before
                if rconf.quantiles or k not in ("quantiles", "per_quantile")}
    identity = {"weights": weights_identity(model_name), "dtype": str(next(model.parameters()).dtype),
                "corpus": corpus.describe(), "window": recording.window,
                "max_windows": recording.max_windows, "recording": settings,
                "version": 4}   # 3: whole layers, window ids; 4: density
    if units is not None:
        identity["units"] = units
    layers = sorted({n.layer for n in neurons})
    points = points or {l: hook_point(model, l) for l in layers}
    windows = lambda: token_windows(corpus, tokenizer, recording.window, recording.max_windows)
    if recording.cache:
        rec = select(layer_recordings(model, tokenizer, points, windows, rconf, identity, progress),
                     neurons, meta={"identity": identity, "config": settings})
    else:
        rec = record(model, tokenizer, windows, neurons, rconf, progress=progress,
                     meta={"identity": identity}, points=points)
    rec.save(target)
    return rec


def layer_recordings(model, tokenizer, points: dict[int, HookPoint], windows, rconf: RecordingConfig,
                     identity: dict, progress: bool) -> list[Recording]:
    """Every unit read at each of ``points`` (one per layer), from the cache (``NEURONLENS_RECORDING_CACHE``, else
    the user cache) or recorded in one pass over ``windows()`` and cached."""
    layers = sorted(points)
    root = Path(os.environ.get("NEURONLENS_RECORDING_CACHE") or cache_dir() / "recordings")
    keys = {l: hashlib.sha256(json.dumps(identity | {"layer": l}, sort_keys=True, default=str)
                              .encode()).hexdigest()[:20] for l in layers}
    found = {l: Recording.saved(root / keys[l]) for l in layers}
    if missing := [l for l in layers if found[l] is None]:
        every = {l: [NeuronId(l, i) for i in range(points[l].width)] for l in missing}
        log.info("Recording all %s units of layer %s once (cached for any of its units)",
                 "/".join(str(len(every[l])) for l in missing), ", ".join(map(str, missing)))
        whole = record(model, tokenizer, windows, [n for l in missing for n in every[l]], rconf,
                       progress=progress, points=points)
        for l in missing:
            found[l] = select([whole], every[l],
                              meta={"identity": identity | {"layer": l}, "config": identity["recording"]})
            save_cached(found[l], root / keys[l])
    if hits := [l for l in layers if l not in missing]:
        log.info("Reusing the cached recording of layer %s", ", ".join(map(str, hits)))
    return [found[l] for l in layers]


def save_cached(rec: Recording, cached: Path) -> None:
    """Save into the cache atomically: a parallel job that finished first keeps its copy."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}-"))
    rec.save(tmp)
    try:
        tmp.rename(cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
