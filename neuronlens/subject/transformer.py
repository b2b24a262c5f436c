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
from neuronlens.files import write_atomic
from neuronlens.records import NeuronId, NeuronRecord
from neuronlens.subject.base import Subject
from neuronlens.subject.hooks import check_layer, check_neuron, hook_point, n_layers, n_neurons
from neuronlens.models import cache_dir, display_name, load_model, resolve
from neuronlens.subject.recording import Recording, RecordingConfig, record

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
        for layer in neurons.get("layers") or ():
            check_layer(config, layer)
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
        return list(recording_for(self.model, model, tokenizer, neurons, corpus, recording, seed,
                                  run_dir, progress).neuron_records())


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
    """Record ``neurons`` of ``model`` (``model_name``: its ``subject.model``) over ``corpus`` with
    the ``recording`` settings into ``run_dir``, or reuse an identical earlier recording from the
    cache."""
    rconf = RecordingConfig(top_k=recording.top_k, n_random=recording.n_random,
                            batch_size=recording.batch_size, seed=seed)
    identity = {"model": model_name, "dtype": str(next(model.parameters()).dtype),
                "corpus": corpus.describe(), "window": recording.window,
                "max_windows": recording.max_windows,
                "neurons": [[n.layer, n.index] for n in neurons], "recording": vars(rconf) | {},
                "version": 2}   # 2: token_bytes, for split characters
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    cached = Path(os.environ.get("NEURONLENS_RECORDING_CACHE") or cache_dir() / "recordings") / key
    target = run_dir / "recording"
    if (saved := Recording.saved(target)) is not None:
        return saved
    if recording.cache and Recording.saved(cached) is not None:
        log.info("Reusing the cached recording %s", cached)
        for name in ("arrays.safetensors", "manifest.json"):   # the manifest last
            write_atomic(target / name, (cached / name).read_bytes())
        if (saved := Recording.saved(target)) is not None:
            return saved
    windows = token_windows(corpus, tokenizer, recording.window, recording.max_windows)
    rec = record(model, tokenizer, windows, neurons, rconf, progress=progress,
                 meta={"identity": identity, "key": key})
    rec.save(target)
    if recording.cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{key}-"))
        rec.save(tmp)
        try:
            tmp.rename(cached)  # atomic; a parallel job that finished first keeps its copy
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return rec
