"""SAE and transcoder latents as a subject: the model is recorded as usual, and the activations
read at the SAE's hook point pass through its encoder, so its latents are the units.

The format is read from the files (``subject.path``: one SAE's folder, or a folder of them, one
per hook point, as sparsify saves a run):

- **sae_lens** (``cfg.json`` + ``sae_weights.safetensors``): ``W_enc`` [d_in, d_sae], ``b_enc``,
  ``W_dec`` [d_sae, d_out], ``b_dec``, ``threshold`` (JumpReLU). Architectures ``standard``,
  ``topk``, ``jumprelu`` and the transcoders (``transcoder``, ``skip_transcoder``,
  ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``), from sae_lens 6 (``metadata.hook_name``)
  and before it (``hook_name``, ``activation_fn_str``, ``activation_fn_kwargs.k`` at the top
  level). Where it reads is a TransformerLens hook name, mapped onto the HF model's modules
  (``hooks.lens_point``). An SAE trained on a TransformerLens model loaded with its weight
  processing (``center_writing_weights``, ``fold_ln``) saw activations shifted from the HF
  model's: neuronlens reads the HF model as it is, and warns where the config says so.
- **sparsify** (EleutherAI; ``cfg.json`` + ``sae.safetensors``): ``encoder.weight``
  [latents, d_in], ``encoder.bias``, ``W_dec`` [latents, d_out], ``b_dec``; the folder's name is
  the hook point, a module of the base model (``layers.3``: its output; a transcoder reads the
  module's input). Latents are the top ``k`` of ReLU(encoder(x - b_dec)) (no ``- b_dec`` for a
  transcoder).

The output side of a latent is its decoder row (``logits.direction_logits``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from neuronlens.models import SubjectError, display_name
from neuronlens.records import NeuronId
from neuronlens.subject.hooks import HookPoint, lens_point, module_point, n_layers, n_neurons
from neuronlens.subject.transformer import ModelSubject, select_units

log = logging.getLogger(__name__)

SAE_LENS_ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu",
                          "transcoder": "relu", "skip_transcoder": "relu",
                          "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu"}


@dataclass
class SparseCoder:
    """One SAE or transcoder, whichever library wrote it: where it reads and how it encodes."""

    path: Path
    format: str                    # "sae_lens" or "sparsify"
    hook: str                      # where it reads, in its library's names
    W_enc: torch.Tensor            # [d_in, d_sae]
    b_enc: torch.Tensor            # [d_sae]
    W_dec: torch.Tensor            # [d_sae, d_out]: latent i writes row i
    b_in: torch.Tensor | None      # subtracted from the input before encoding (None: nothing)
    activation: str                # "relu", "topk" or "jumprelu"
    k: int | None = None           # topk
    threshold: torch.Tensor | None = None   # jumprelu
    scale: torch.Tensor | None = None       # [d_sae] pre-activations times it (sae_lens topk's
                                            # rescale_acts_by_decoder_norm)
    transcoder: bool = False

    @property
    def width(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def layer(self) -> int:
        found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", self.hook)
        if not found:
            raise SubjectError(f"The SAE in {self.path} reads {self.hook!r}, which names no layer; "
                               "neuronlens interprets SAEs that read a numbered layer.")
        return int(found[1])

    def to(self, device) -> SparseCoder:
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return replace(self, **moved)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latents [..., d_sae] of the activations ``x`` [..., d_in]."""
        x = x.to(self.W_enc.dtype)
        if self.b_in is not None:
            x = x - self.b_in
        pre = torch.addmm(self.b_enc, x.reshape(-1, x.shape[-1]), self.W_enc).unflatten(0, x.shape[:-1])
        if self.scale is not None:
            pre = pre * self.scale
        if self.activation == "topk":   # laid out latent-major, as the recorder reads them
            values, indices = pre.topk(self.k, dim=-1)
            out = pre.new_zeros(pre.shape[-1], *pre.shape[:-1]).movedim(0, -1)
            return out.scatter_(-1, indices, values.relu())
        acts = pre.relu()
        return acts * (pre > self.threshold) if self.activation == "jumprelu" else acts

    def point(self, model) -> HookPoint:
        """Where it reads in ``model``, encoding as it goes."""
        if self.format == "sae_lens":
            at = lens_point(model, self.hook)
        else:
            at = module_point(model, self.hook, "input" if self.transcoder else "output")
        return replace(at, width=self.width, encode=self.to(next(model.parameters()).device).encode)

    def identity(self) -> dict:
        """What its latents depend on, as the model's weights are keyed: its config's hash and its
        weight files' sizes and modification times."""
        config = hashlib.sha256((self.path / "cfg.json").read_bytes()).hexdigest()[:16]
        weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(self.path.glob("*.safetensors"))}
        return {"config": config, "weights": weights, "hook": self.hook}


def load_coder(path: str | Path, hook: str | None = None) -> SparseCoder:
    """The SAE or transcoder saved in ``path`` by sae_lens or sparsify (``hook``: where a sparsify
    one reads, when its folder is not named for it)."""
    path = Path(path)
    try:
        cfg = json.loads((path / "cfg.json").read_text())
    except (OSError, ValueError) as e:
        raise SubjectError(f"Cannot read the SAE config {path / 'cfg.json'} ({e}); subject.path must be "
                           "an SAE's folder as sae_lens or sparsify save it.") from None
    if (path / "sae_weights.safetensors").exists():
        return _sae_lens(path, cfg)
    if (path / "sae.safetensors").exists():
        return _sparsify(path, cfg, hook or path.name)
    raise SubjectError(f"{path} holds cfg.json but no sae_weights.safetensors (sae_lens) or "
                       "sae.safetensors (sparsify); neuronlens reads those two formats.")


def _refuse(path: Path, what: str) -> SubjectError:
    return SubjectError(f"The SAE in {path} {what}.")


def _sae_lens(path: Path, cfg: dict) -> SparseCoder:
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name")
    architecture = cfg.get("architecture", "standard")
    activation = SAE_LENS_ARCHITECTURES.get(architecture)
    if activation is None:
        raise _refuse(path, f"has architecture {architecture!r}; neuronlens reads "
                      f"{', '.join(SAE_LENS_ARCHITECTURES)}")
    if architecture == "standard" and cfg.get("activation_fn_str", "relu") != "relu":   # before 6.0
        activation = cfg["activation_fn_str"]
        if activation != "topk":
            raise _refuse(path, f"uses activation {activation!r}; neuronlens reads relu and topk")
    if (norm := cfg.get("normalize_activations") or "none") != "none":
        raise _refuse(path, f"normalises its input ({norm}); fold that into its weights first (sae_lens: "
                      "sae.fold_activation_norm_scaling_factor) and save it again")
    if not hook or hook.endswith("hook_z") or cfg.get("reshape_activations", "none") != "none":
        raise _refuse(path, f"reads {hook!r}; neuronlens reads the residual stream and the MLP, not "
                      "attention heads' hook_z")
    processed = meta.get("model_from_pretrained_kwargs") or cfg.get("model_from_pretrained_kwargs") or {}
    if changed := [k for k in ("center_writing_weights", "fold_ln") if processed.get(k)]:
        log.warning("The SAE in %s was trained on a TransformerLens model loaded with %s, which changes "
                    "the activations it reads; neuronlens reads the HF model as it is, so its latents "
                    "fire somewhat differently here.", path, " and ".join(f"{k}=True" for k in changed))
    w = load_file(path / "sae_weights.safetensors")
    transcoder = "transcoder" in architecture
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if activation == "jumprelu" and "threshold" not in w:
        raise _refuse(path, "is JumpReLU but its weights hold no threshold")
    scale = w["W_dec"].float().norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else None
    coder = SparseCoder(path, "sae_lens", hook, w["W_enc"].float(), w["b_enc"].float(),
                        w["W_dec"].float(), None, activation, k=int(k) if activation == "topk" else None,
                        threshold=w["threshold"].float() if activation == "jumprelu" else None,
                        scale=scale, transcoder=transcoder)
    if cfg.get("apply_b_dec_to_input", not transcoder) and not transcoder:
        coder.b_in = w["b_dec"].float()
    return _checked(coder, cfg.get("d_in"), cfg.get("d_sae"))


def _sparsify(path: Path, cfg: dict, hook: str) -> SparseCoder:
    if (activation := cfg.get("activation", "topk")) != "topk":
        raise _refuse(path, f"uses activation {activation!r}; neuronlens reads sparsify's topk")
    w = load_file(path / "sae.safetensors")
    transcoder = bool(cfg.get("transcode"))
    coder = SparseCoder(path, "sparsify", hook, w["encoder.weight"].float().T.contiguous(),
                        w["encoder.bias"].float(), w["W_dec"].float(),
                        None if transcoder else w["b_dec"].float(), "topk", k=int(cfg["k"]),
                        transcoder=transcoder)
    d_in = cfg.get("d_in")
    return _checked(coder, d_in, cfg.get("num_latents") or (d_in or 0) * cfg.get("expansion_factor", 0))


def _checked(coder: SparseCoder, d_in, d_sae) -> SparseCoder:
    if (d_in and coder.d_in != d_in) or (d_sae and coder.width != d_sae) or \
            coder.W_dec.shape[0] != coder.width:
        raise _refuse(coder.path, f"has weights of shapes W_enc {tuple(coder.W_enc.shape)} and W_dec "
                      f"{tuple(coder.W_dec.shape)}, which do not match its cfg.json (d_in {d_in}, "
                      f"d_sae {d_sae})")
    return coder


def load_coders(path: str | Path, hook: str | None = None) -> dict[int, SparseCoder]:
    """The SAEs in ``path`` (one SAE's folder, or a folder of them), by the layer each reads."""
    path = Path(path)
    if not path.is_dir():
        raise SubjectError(f"subject.path={path} is not a folder; give the folder an SAE was saved in "
                           "(cfg.json and its weights).")
    folders = [path] if (path / "cfg.json").exists() else \
        sorted((p for p in path.iterdir() if (p / "cfg.json").exists()), key=lambda p: p.name)
    if not folders:
        raise SubjectError(f"{path} holds no SAE: neither it nor a folder in it has a cfg.json.")
    coders: dict[int, SparseCoder] = {}
    for folder in folders:
        coder = load_coder(folder, hook if folder == path else None)
        if coder.layer in coders:
            raise SubjectError(f"Two SAEs in {path} read layer {coder.layer} ({coders[coder.layer].path.name}, "
                               f"{folder.name}); point subject.path at one of them.")
        coders[coder.layer] = coder
    return coders


class SAESubject(ModelSubject):
    """``subject=sae``: the latents of the SAEs (or transcoders) in ``path``, read on ``model``."""

    def __init__(self, model: str = "embedded", path: str = "", hook: str | None = None,
                 device: str = "auto", dtype: str = "auto", name: str | None = None):
        super().__init__(model, device, dtype)
        self.path, self.hook = path, hook
        self.name = name or f"{display_name(model)} SAE {Path(path).name}"

    @cached_property
    def coders(self) -> dict[int, SparseCoder]:
        return load_coders(self.path, self.hook)

    def check(self, neurons: DictConfig) -> None:
        """The SAE files against the model's config.json and the ``neurons`` settings, before
        anything loads: its layers, its input width, the latent indices."""
        from transformers import AutoConfig

        from neuronlens.models import resolve

        coders = self.coders
        try:
            config = AutoConfig.from_pretrained(resolve(self.model))
        except (OSError, ValueError):
            config = None
        for coder in coders.values():
            if config is None:
                break
            if coder.layer >= n_layers(config):
                raise _refuse(coder.path, f"reads layer {coder.layer} ({coder.hook}), but the model has "
                              f"{n_layers(config)} layers; is subject.model the model it was trained on?")
            neurons_in = coder.hook.endswith(("hook_post", "act_fn", "down_proj")) and not coder.transcoder
            width = n_neurons(config) if neurons_in else config.get_text_config().hidden_size
            if coder.d_in != width:
                raise _refuse(coder.path, f"reads vectors of width {coder.d_in} at {coder.hook}, but the "
                              f"model's are {width} wide; is subject.model the model it was trained on?")
        self._layers(neurons)
        if neurons.get("which") == "list":
            for layer in self._layers(neurons):
                select_units({layer: coders[layer].width}, [layer], 1, "list", neurons.get("indices"), 0,
                             "latents")

    def _layers(self, neurons: DictConfig) -> list[int]:
        have = sorted(self.coders)
        layers = neurons.get("layers")
        if layers is None:
            return have
        if missing := [l for l in layers if l not in self.coders]:
            reads = ", ".join(f"{l} ({self.coders[l].hook})" for l in have)
            raise SubjectError(f"neurons.layers asks for layer {missing[0]}, but the SAEs in {self.path} "
                               f"read layer {reads}; set neurons.layers to those, or null.")
        return list(dict.fromkeys(layers))

    def select(self, neurons: DictConfig, seed: int) -> list[NeuronId]:
        layers = self._layers(neurons)
        return select_units({l: self.coders[l].width for l in layers}, layers, neurons.per_layer,
                            neurons.which, neurons.indices, seed, "latents")

    def points(self, model, layers: list[int]) -> dict[int, HookPoint]:
        return {l: self.coders[l].point(model) for l in layers}

    def units(self) -> dict:
        return {str(l): coder.identity() for l, coder in sorted(self.coders.items())}

    def directions(self, model, layer: int, indices: list[int]) -> torch.Tensor | None:
        coder = self.coders[layer]
        hidden = model.get_output_embeddings().weight.shape[1]
        if coder.W_dec.shape[1] != hidden:
            return None
        return coder.W_dec[indices]
