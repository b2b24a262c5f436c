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
from neuronlens.subject.hooks import (check_neuron, hook_point, hook_point_from_config, n_layers,
                                      n_neurons)
from neuronlens.subject.logits import neuron_logits
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
        records = list(recording_for(self.model, model, tokenizer, neurons, corpus, recording, seed,
                                     run_dir, progress).neuron_records())
        for layer in sorted({n.layer for n in neurons}):
            mine = [r for r in records if r.neuron_id.layer == layer]
            logits = neuron_logits(model, tokenizer, hook_point(model, layer).module,
                                   [r.neuron_id.index for r in mine])
            for r in mine:
                r.logits = logits[r.neuron_id.index]
        return records


def select_neurons(model, layers, per_layer: int, which: str, indices, seed: int) -> list[NeuronId]:
    layers = list(dict.fromkeys(layers)) if layers is not None else [n_layers(model) // 2]
    if not layers:
        raise UserError("neurons.layers is empty; give at least one layer, or null for the middle one.")
    for layer in layers:
        hook_point(model, layer)  # a clear error for an unsupported model or a bad layer
    width = n_neurons(model)
    if which == "list":
        if not indices:
            raise UserError("neurons.which=list needs neurons.indices=[...].")
        for i in indices:
            check_neuron(model, i)
        chosen = list(dict.fromkeys(int(i) for i in indices))
        return [NeuronId(l, i) for l in layers for i in chosen]
    if per_layer < 1:
        raise UserError(f"neurons.per_layer must be at least 1, got {per_layer}.")
    if which == "first":
        return [NeuronId(l, i) for l in layers for i in range(min(per_layer, width))]
    if which == "random":
        return [NeuronId(l, i) for l in layers
                for i in sorted(random.Random(f"{seed}/{l}").sample(range(width), min(per_layer, width)))]
    raise UserError(f"neurons.which must be first, random or list, not {which!r}.")


def recording_for(model_name: str, model, tokenizer, neurons: list[NeuronId], corpus: Corpus,
                  recording: DictConfig, seed: int, run_dir: Path, progress: bool = False
                  ) -> Recording:
    """The recording of ``neurons`` of ``model`` (``model_name``: its ``subject.model``) over
    ``corpus`` with the ``recording`` settings, kept in ``run_dir``. With ``recording.cache``,
    each layer is recorded once, every unit of it, and cached under a key of the weights, the
    corpus and the settings, not of the neurons: any later run or shard on any units of that
    layer selects its rows from the cache and runs no forward pass."""
    target = run_dir / "recording"
    if (saved := Recording.saved(target)) is not None:
        return saved
    rconf = RecordingConfig(top_k=recording.top_k, n_random=recording.n_random,
                            batch_size=recording.batch_size, seed=seed)
    identity = {"weights": weights_identity(model_name), "dtype": str(next(model.parameters()).dtype),
                "corpus": corpus.describe(), "window": recording.window,
                "max_windows": recording.max_windows, "recording": vars(rconf) | {},
                "version": 4}   # 3: whole layers, window ids; 4: density
    windows = lambda: token_windows(corpus, tokenizer, recording.window, recording.max_windows)
    if recording.cache:
        layers = sorted({n.layer for n in neurons})
        rec = select(layer_recordings(model, tokenizer, layers, windows, rconf, identity, progress),
                     neurons, meta={"identity": identity, "config": vars(rconf) | {}})
    else:
        rec = record(model, tokenizer, windows(), neurons, rconf, progress=progress,
                     meta={"identity": identity})
    rec.save(target)
    return rec


def layer_recordings(model, tokenizer, layers: list[int], windows, rconf: RecordingConfig,
                     identity: dict, progress: bool) -> list[Recording]:
    """Every unit of each of ``layers``, from the cache (``NEURONLENS_RECORDING_CACHE``, else
    the user cache) or recorded in one pass over ``windows()`` and cached."""
    root = Path(os.environ.get("NEURONLENS_RECORDING_CACHE") or cache_dir() / "recordings")
    keys = {l: hashlib.sha256(json.dumps(identity | {"layer": l}, sort_keys=True, default=str)
                              .encode()).hexdigest()[:20] for l in layers}
    found = {l: Recording.saved(root / keys[l]) for l in layers}
    if missing := [l for l in layers if found[l] is None]:
        width = n_neurons(model)
        log.info("Recording all %d units of layer %s once (cached for any of its units)",
                 width, ", ".join(map(str, missing)))
        whole = record(model, tokenizer, windows(), [NeuronId(l, i) for l in missing for i in range(width)],
                       rconf, progress=progress)
        for l in missing:
            found[l] = select([whole], [NeuronId(l, i) for i in range(width)],
                              meta={"identity": identity | {"layer": l}, "config": vars(rconf) | {}})
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
