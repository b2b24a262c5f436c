"""Where the MLP neurons of each architecture live, and hooks that read (or overwrite) them.

One rule for every architecture: a layer's neurons are the input of its MLP's output projection
(``down_proj`` in the Llama family, Phi-3, Gemma 1-3; ``c_proj`` in GPT-2 and Starcoder2;
``dense_4h_to_h`` in GPT-NeoX/Pythia; ``fc2`` in Phi-1/2 and OPT; ``fc_out`` in GPT-J), that is
the activation after the nonlinearity (times the up projection where the MLP is gated). The
layers are found through the model's decoder (``get_decoder()``), so a text model inside a
multimodal one (Gemma 3 4B and up) is found too. Mixture-of-experts models are refused from their
config: their neurons belong to experts.

Other units (SAE latents, transcoder latents) are read at a hook point named by module
(``module_point``: sparsify's hookpoints) or by TransformerLens hook name (``lens_point``:
sae_lens's), and pass through the point's ``encode`` (the SAE's encoder) before anyone sees them.
"""

from __future__ import annotations

from contextlib import contextmanager
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from neuronlens.models import SubjectError

# A layer's MLP output projection, by its name under the decoder layer; the first found is used.
OUTPUT_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "mlp.fc_out",
                      "fc2")
WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")      # the MLP's width in config.json
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class HookPoint:
    module: str    # dotted path of the module, e.g. "model.layers.3.mlp.down_proj"
    kind: str      # "output" (read the module's output) or "input" (read its first input)
    width: int | None = None   # how many units are read there (None: not known yet)
    # the units from what is read ([..., d_in] -> [..., width]: an SAE's encoder); None: what is
    # read are the units. A point with an encoder is read-only.
    encode: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)


def _text_config(model: nn.Module):
    """The text model's config, of a model or of a config itself (read before the weights load)."""
    config = getattr(model, "config", model)
    return getattr(config, "get_text_config", lambda: config)()


def n_layers(model: nn.Module) -> int:
    return int(_text_config(model).num_hidden_layers)


def n_neurons(model: nn.Module) -> int:
    config = _text_config(model)
    width = next((getattr(config, key) for key in WIDTH_KEYS if getattr(config, key, None)), None)
    return int(width or 4 * config.hidden_size)   # GPT-2 and GPT-J: n_inner null means 4 x width


def check_dense(model: nn.Module) -> None:
    """A mixture-of-experts model, refused in one line (from its config alone)."""
    config = _text_config(model)
    for key in EXPERT_KEYS:
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 1:
            raise SubjectError(f"Model type {config.model_type!r} is a mixture of experts ({n} experts "
                               f"per layer, {key} in its config): neuronlens records the neurons of "
                               "dense MLPs only; choose a dense model.")


def decoder(model: nn.Module) -> nn.Module:
    """The text decoder: its layers and final norm (the model itself for a bare one)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def decoder_layers(model: nn.Module) -> str:
    """The dotted path of the model's list of decoder layers."""
    text = decoder(model)
    for attr in ("layers", "h"):
        if isinstance(getattr(text, attr, None), nn.ModuleList):
            prefix = next(name for name, m in model.named_modules() if m is text)
            return f"{prefix}.{attr}" if prefix else attr
    raise SubjectError(f"neuronlens cannot find the decoder layers of model type "
                       f"{_text_config(model).model_type!r} (no `layers` or `h` list in its decoder).")


def hook_point(model: nn.Module, layer: int) -> HookPoint:
    check_dense(model)
    check_layer(model, layer)
    block = f"{decoder_layers(model)}.{layer}"
    for name in OUTPUT_PROJECTIONS:
        try:
            model.get_submodule(f"{block}.{name}")
        except AttributeError:
            continue
        return HookPoint(f"{block}.{name}", "input", n_neurons(model))
    raise SubjectError(f"neuronlens does not know where the MLP neurons of model type "
                       f"{_text_config(model).model_type!r} are: its layer {block} has none of the "
                       f"output projections {', '.join(OUTPUT_PROJECTIONS)} (supported: GPT-2, the "
                       "Llama family, Phi, Gemma 1-3, GPT-NeoX, OPT, GPT-J, Starcoder2).")


def hook_point_from_config(config, layer: int) -> HookPoint | None:
    """``hook_point`` of a model built from ``config`` on the meta device (no weights, no memory),
    so that an unsupported model is refused before it loads; None if it cannot be built so."""
    from transformers import AutoModelForCausalLM

    check_dense(config)
    check_layer(config, layer)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - custom code and the like: the loaded model is checked later
        return None
    return hook_point(model, layer)


def module_point(model: nn.Module, name: str, kind: str) -> HookPoint:
    """The module ``name`` as named under the base model (as sparsify names its hookpoints:
    ``layers.3``, ``h.3.mlp``) or under the whole model."""
    base = next((n for n, m in model.named_modules() if m is model.base_model), "") \
        if hasattr(model, "base_model") else ""
    for full in dict.fromkeys([f"{base}.{name}" if base else name, name]):
        try:
            model.get_submodule(full)
        except AttributeError:
            continue
        return HookPoint(full, kind)
    raise SubjectError(f"This model ({_text_config(model).model_type!r}) has no module {name!r} "
                       "to hook; name a module of its base model, as model.base_model.named_modules() "
                       "lists them (for example layers.3 or layers.3.mlp).")


# TransformerLens hook names that map onto the modules of an HF model: blocks.L.<what>
LENS_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_in",
              "ln2.hook_normalized", "hook_mlp_out", "mlp.hook_post")
MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")   # the norm before the MLP


def lens_point(model: nn.Module, hook_name: str) -> HookPoint:
    """The HF module read for a TransformerLens hook name (as sae_lens names where an SAE reads):
    the residual stream before, between and after a layer's blocks, and the MLP's input, output
    and neurons."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    if not match or match[2] not in LENS_HOOKS:
        raise SubjectError(f"neuronlens cannot read the TransformerLens hook {hook_name!r}; it reads "
                           f"blocks.L.{{{', '.join(LENS_HOOKS)}}} (attention heads' hook_z are not read).")
    layer, what = int(match[1]), match[2]
    check_layer(model, layer)
    block = f"{decoder_layers(model)}.{layer}"
    if what == "mlp.hook_post":
        return hook_point(model, layer)
    if what in ("hook_resid_pre", "hook_resid_post"):
        return HookPoint(block, "input" if what == "hook_resid_pre" else "output")
    if what == "hook_resid_mid":
        norm = next((n for n in MLP_NORMS if hasattr(model.get_submodule(block), n)), None)
        if norm is None:
            raise SubjectError(f"Model type {_text_config(model).model_type!r} has no norm before its "
                               f"MLP ({', '.join(MLP_NORMS)}), so {hook_name} cannot be read.")
        return HookPoint(f"{block}.{norm}", "input")
    try:
        model.get_submodule(f"{block}.mlp")
    except AttributeError:
        raise SubjectError(f"Model type {_text_config(model).model_type!r} has no `mlp` module in its "
                           f"layers, so {hook_name} cannot be read.") from None
    return HookPoint(f"{block}.mlp", "output" if what == "hook_mlp_out" else "input")


def check_layer(model: nn.Module, layer: int) -> None:
    total = n_layers(model)
    if not 0 <= layer < total:
        raise SubjectError(f"Layer {layer} is out of range: this model has {total} layers "
                           f"(0-{total - 1}).")


def check_neuron(model: nn.Module, index: int) -> None:
    check_unit(n_neurons(model), 0, index)


def check_unit(width: int, layer: int, index: int, latents: bool = False) -> None:
    """A unit's index against the width of its layer (of MLP neurons, or of an SAE's latents)."""
    if 0 <= index < width:
        return
    if not latents:
        raise SubjectError(f"Neuron index {index} is out of range: this model has {width} MLP "
                           f"neurons per layer (0-{width - 1}).")
    raise SubjectError(f"Latent index {index} is out of range: the SAE at layer {layer} has "
                       f"{width} latents (0-{width - 1}).")


class StopForward(Exception):
    """Raised by a hook once the deepest layer needed has been read: nothing after it runs."""


# A hook function gets the layer and the activations [batch, tokens, neurons]; it may return a
# replacement tensor (to steer) or None (to only read).
HookFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def _call(fn: HookFn, layer: int, point: HookPoint, acts: torch.Tensor) -> torch.Tensor | None:
    if point.encode is None:
        return fn(layer, acts)
    if fn(layer, point.encode(acts)) is not None:
        raise ValueError(f"The units at {point.module} are encoded from what is read there; they can "
                         "be read, not overwritten.")
    return None


@contextmanager
def neuron_hooks(model: nn.Module, layers: list[int], fn: HookFn,
                 points: dict[int, HookPoint] | None = None) -> Iterator[None]:
    """Call ``fn(layer, activations)`` on every forward pass, for each layer in ``layers``, with
    the activations read at ``points[layer]`` (by default, the layer's MLP neurons).

    All module paths are resolved before any hook is attached, and the hooks are removed on exit
    even if the body raises.
    """
    points = {layer: (points or {}).get(layer) or hook_point(model, layer) for layer in layers}
    handles = []
    try:
        for layer, point in points.items():
            module = model.get_submodule(point.module)
            if point.kind == "output":
                def hook(_m, _inp, out, layer=layer, point=point):
                    # a decoder layer may return (hidden states, ...): the first is what is read
                    new = _call(fn, layer, point, out[0] if isinstance(out, tuple) else out)
                    return None if new is None else (new, *out[1:]) if isinstance(out, tuple) else new
                handles.append(module.register_forward_hook(hook))
            else:
                def pre_hook(_m, args, kwargs, layer=layer, point=point):
                    # the first input, given by position or (a decoder layer's) as hidden_states=
                    if args:
                        new = _call(fn, layer, point, args[0])
                        return None if new is None else ((new, *args[1:]), kwargs)
                    new = _call(fn, layer, point, kwargs["hidden_states"])
                    return None if new is None else (args, kwargs | {"hidden_states": new})
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
