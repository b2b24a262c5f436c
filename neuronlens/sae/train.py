"""An SAE trained here, with EleutherAI's own trainer (``eai-sparsify``, the ``sae`` extra), on the
run's corpus: top-k latents on the residual stream after one layer of the subject model, saved as
sparsify saves them, so that ``neuronlens subject=sae subject.path=<run>/sae`` interprets it.

The model runs only up to the layer read: its later layers are left out of the forward while it
trains (what the layer outputs is unchanged). Each epoch is the corpus's windows in a new order.
Afterwards the SAE is measured over every window of the corpus: the fraction of variance it
explains (1 - sum |x - x_hat|^2 / sum |x - mean x|^2) and its dead latents (never above 0). The
first token of a sequence carries a massive activation in many models (SmolLM2-135M's residual
stream after layer 15: a norm of ~24,000 there against ~180 elsewhere). Left in, it sets
sparsify's initial decoder bias (the first batch's mean) and makes the fraction explained look
near-perfect, so each window starts with the end-of-text token, which training leaves out, and
the fraction explained is over every token but that first one (over all tokens too, beside it).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from neuronlens.corpus import token_windows
from neuronlens.errors import UserError
from neuronlens.files import write_atomic
from neuronlens.models import load_model, resolve
from neuronlens.subject.hooks import HookPoint, decoder, decoder_layers, n_layers, neuron_hooks
from neuronlens.subject.sae import load_coders

log = logging.getLogger(__name__)


def hookpoint(model, layer: int) -> str:
    """The residual stream after ``layer``, named as sparsify names it: under the base model."""
    base = next(n for n, m in model.named_modules() if m is model.base_model)
    layers = decoder_layers(model)
    return f"{layers[len(base) + 1:] if base else layers}.{layer}"


@contextmanager
def truncated(model, layer: int):
    """``model`` with its decoder layers after ``layer`` left out (restored on exit)."""
    text = decoder(model)
    attr = "layers" if hasattr(text, "layers") else "h"
    whole = getattr(text, attr)
    setattr(text, attr, torch.nn.ModuleList(whole[:layer + 1]))
    try:
        yield model
    finally:
        setattr(text, attr, whole)


def run(cfg: DictConfig, run_dir: Path, command: str) -> dict:
    """Train (unless ``run_dir/sae`` already holds the SAE: then only measure it) and write
    ``run_dir/summary.json``."""
    from datasets import Dataset, concatenate_datasets
    from hydra.utils import instantiate
    from transformers import AutoConfig
    try:
        from sparsify import SaeConfig, Trainer, TrainConfig
    except ImportError:
        raise UserError('Training an SAE needs EleutherAI\'s sparsify: pip install "neuronlens[sae]".') from None

    settings = cfg.sae
    corpus = instantiate(cfg.corpus)
    config = AutoConfig.from_pretrained(resolve(cfg.subject.model))   # the layer, before the weights
    layer = n_layers(config) // 2 if settings.layer is None else settings.layer
    if not 0 <= layer < n_layers(config):
        raise UserError(f"sae.layer={layer} is out of range: this model has {n_layers(config)} layers "
                        f"(0-{n_layers(config) - 1}).")
    model, tokenizer = load_model(cfg.subject.model, cfg.subject.device, cfg.subject.dtype)
    point = hookpoint(model, layer)
    # each window starts with the end-of-text token, where the model puts its attention sink, and
    # that token is left out of training (sparsify's exclude_tokens): it would set the decoder bias
    sink = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    windows = [sink + w for w in token_windows(corpus, tokenizer, settings.window - len(sink),
                                               settings.max_windows)]
    out = run_dir / "sae"
    started = time.monotonic()
    if not (out / point / "sae.safetensors").exists():
        data = Dataset.from_dict({"input_ids": windows})
        epochs = concatenate_datasets([data.shuffle(seed=settings.seed + e) for e in range(settings.epochs)])
        train = TrainConfig(SaeConfig(expansion_factor=settings.expansion_factor, k=settings.k),
                            batch_size=settings.batch_size, lr=settings.lr, hookpoints=[point],
                            auxk_alpha=settings.auxk_alpha, dead_feature_threshold=settings.dead_after,
                            init_seeds=[settings.seed], exclude_tokens=sink, log_to_wandb=False,
                            save_dir=str(run_dir), run_name="sae", save_every=10**9)
        torch.manual_seed(settings.seed)
        with truncated(model.base_model, layer) as base:
            trainer = Trainer(train, epochs.with_format("torch"), base)
            trainer.fit()
    minutes = (time.monotonic() - started) / 60
    coder = load_coders(out)[layer]
    summary = {"command": command, "model": cfg.subject.model, "layer": layer, "hookpoint": point,
               "latents": coder.width, "k": coder.k, "windows": len(windows),
               "tokens_trained": len(windows) * settings.window * settings.epochs,
               **measure(model, coder, windows, settings.batch_size, layer),
               "train_minutes": round(minutes, 2), "path": str(out)}
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


@torch.no_grad()
def measure(model, coder, windows: list[list[int]], batch_size: int, layer: int) -> dict:
    """Fraction of variance explained (over all tokens, and over all but each window's first)
    and dead latents over ``windows``."""
    device = next(model.parameters()).device
    encoder = coder.to(device)
    sums = {part: {"err": 0.0, "x": 0.0, "x2": 0.0, "n": 0} for part in ("all", "after_first")}
    fired = torch.zeros(coder.width, dtype=torch.bool, device=device)

    def read(_layer, x):
        latents = encoder.encode(x.float())
        fired.__ior__((latents > 0).flatten(0, -2).any(0))
        error = (latents @ encoder.W_dec + (encoder.b_in if encoder.b_in is not None else 0) - x.float())
        for part, keep in (("all", slice(None)), ("after_first", slice(1, None))):
            a, e = x[:, keep].double().flatten(0, -2), error[:, keep].double()
            sums[part]["err"] += float(e.pow(2).sum())
            sums[part]["x"] = sums[part]["x"] + a.sum(0)
            sums[part]["x2"] += float(a.pow(2).sum())
            sums[part]["n"] += len(a)

    point = coder.point(model)
    plain = HookPoint(point.module, point.kind)   # read plain: encoded in `read`
    with truncated(model.base_model, layer) as base, neuron_hooks(model, [layer], read, {layer: plain}):
        for start in range(0, len(windows), batch_size):
            base(input_ids=torch.tensor(windows[start:start + batch_size], device=device))

    def explained(s: dict) -> float:
        return round(1 - s["err"] / (s["x2"] - float(s["x"].pow(2).sum()) / s["n"]), 4)

    return {"fraction_of_variance_explained": explained(sums["after_first"]),
            "fraction_of_variance_explained_all_tokens": explained(sums["all"]),
            "dead_latents": int((~fired).sum()), "tokens_measured": sums["all"]["n"]}
