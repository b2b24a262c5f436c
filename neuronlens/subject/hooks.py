"""Where the MLP neurons of each architecture live, and hooks that read (or overwrite) them.

GPT-2: the output of ``mlp.act`` (after the GELU). Llama family (SmolLM2, Llama, Mistral, Qwen,
Gemma, ...): the input of ``mlp.down_proj`` (after gate * up).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from neuronlens.models import SubjectError

GPT2_TYPES = {"gpt2"}
LLAMA_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
               "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "phi3", "cohere", "starcoder2"}


@dataclass(frozen=True)
class HookPoint:
    module: str    # dotted path of the module, e.g. "model.layers.3.mlp.down_proj"
    kind: str      # "output" (read the module's output) or "input" (read its first input)


def _text_config(model: nn.Module):
    """The text model's config, of a model or of a config itself (read before the weights load)."""
    config = getattr(model, "config", model)
    return getattr(config, "get_text_config", lambda: config)()


def n_layers(model: nn.Module) -> int:
    return int(_text_config(model).num_hidden_layers)


def n_neurons(model: nn.Module) -> int:
    config = _text_config(model)
    if config.model_type in GPT2_TYPES:
        return int(config.n_inner or 4 * config.n_embd)
    return int(config.intermediate_size)


def hook_point(model: nn.Module, layer: int) -> HookPoint:
    model_type = _text_config(model).model_type
    if model_type in GPT2_TYPES:
        point = HookPoint(f"transformer.h.{layer}.mlp.act", "output")
    elif model_type in LLAMA_TYPES:
        point = HookPoint(f"model.layers.{layer}.mlp.down_proj", "input")
    else:
        raise SubjectError(
            f"neuronlens does not know where the MLP neurons of model type {model_type!r} are; "
            f"supported: {', '.join(sorted(GPT2_TYPES | LLAMA_TYPES))}.")
    check_layer(model, layer)
    try:
        model.get_submodule(point.module)
    except AttributeError as e:
        raise SubjectError(f"Model type {model_type!r} has no module {point.module}; "
                           "its layout differs from the standard one.") from e
    return point


def check_layer(model: nn.Module, layer: int) -> None:
    total = n_layers(model)
    if not 0 <= layer < total:
        raise SubjectError(f"Layer {layer} is out of range: this model has {total} layers "
                           f"(0-{total - 1}).")


def check_neuron(model: nn.Module, index: int) -> None:
    total = n_neurons(model)
    if not 0 <= index < total:
        raise SubjectError(f"Neuron index {index} is out of range: this model has {total} MLP "
                           f"neurons per layer (0-{total - 1}).")


class StopForward(Exception):
    """Raised by a hook once the deepest layer needed has been read: nothing after it runs."""


# A hook function gets the layer and the activations [batch, tokens, neurons]; it may return a
# replacement tensor (to steer) or None (to only read).
HookFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@contextmanager
def neuron_hooks(model: nn.Module, layers: list[int], fn: HookFn) -> Iterator[None]:
    """Call ``fn(layer, activations)`` on every forward pass, for each layer in ``layers``.

    All module paths are resolved before any hook is attached, and the hooks are removed on exit
    even if the body raises.
    """
    points = {layer: hook_point(model, layer) for layer in layers}
    handles = []
    try:
        for layer, point in points.items():
            module = model.get_submodule(point.module)
            if point.kind == "output":
                def hook(_m, _inp, out, layer=layer):
                    return fn(layer, out)
                handles.append(module.register_forward_hook(hook))
            else:
                def pre_hook(_m, args, layer=layer):
                    new = fn(layer, args[0])
                    return None if new is None else (new, *args[1:])
                handles.append(module.register_forward_pre_hook(pre_hook))
        yield
    finally:
        for h in handles:
            h.remove()
