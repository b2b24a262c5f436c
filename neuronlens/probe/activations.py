"""MLP neuron activations of whole texts: one number per (text, neuron), pooled over the tokens.

The hooks are the recorder's (`neuron_hooks`), so the probe reads the very activation that the
explanations describe and that steering overwrites. Texts are tokenised as the recorder does (no
special tokens), batched by length, and the forward pass stops after the deepest hooked layer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from neuronlens.errors import UserError
from neuronlens.records import NeuronId
from neuronlens.subject.hooks import StopForward, n_neurons, neuron_hooks

POOLINGS = ("mean", "max", "last")


def columns(model, layers: Sequence[int]) -> list[NeuronId]:
    """The neuron behind each column of `pooled_activations(model, ..., layers)`."""
    width = n_neurons(model)
    return [NeuronId(layer, i) for layer in layers for i in range(width)]


def encode(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    if max_tokens < 1:
        raise UserError(f"probe.max_tokens must be at least 1, got {max_tokens}.")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [x[:max_tokens] or [tokenizer.eos_token_id or 0] for x in ids]


def _pool(acts: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, W] activations -> [B, W], over each text's own tokens only."""
    if pooling == "mean":
        return (acts * mask[..., None]).sum(1) / lengths[:, None]
    if pooling == "max":
        return acts.masked_fill(~mask[..., None], -torch.inf).amax(1)
    return acts[torch.arange(len(acts)), lengths - 1]


def _batches(ids: list[list[int]], batch_size: int):
    """Batches of similar length (little padding); yields positions in ``ids`` and the batch."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield rows, [ids[i] for i in rows]


@torch.no_grad()
def pooled_activations(model, tokenizer, texts: Sequence[str], layers: Sequence[int],
                       pooling: str = "mean", max_tokens: int = 64, batch_size: int = 32,
                       progress: bool = False) -> np.ndarray:
    """[len(texts), len(layers) * neurons] float32: each layer's neurons, pooled per text."""
    if pooling not in POOLINGS:
        raise UserError(f"probe.pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}.")
    if not layers:
        raise UserError("probe.layers is empty; give at least one layer, or null for all.")
    layers = list(layers)
    device = next(model.parameters()).device
    ids = encode(tokenizer, texts, max_tokens)
    width = n_neurons(model)
    out = np.zeros((len(ids), len(layers) * width), dtype=np.float32)
    deepest = max(layers)
    pooled: dict[int, torch.Tensor] = {}
    batch: dict[str, torch.Tensor] = {}

    def grab(layer: int, acts: torch.Tensor) -> None:
        pooled[layer] = _pool(acts.float(), batch["mask"], batch["lengths"], pooling)
        if layer == deepest:
            raise StopForward

    bar = tqdm(total=len(ids), desc="activations", unit="text", disable=not progress)
    with neuron_hooks(model, sorted(set(layers)), grab):
        for rows, chunk in _batches(ids, batch_size):
            T = max(map(len, chunk))
            input_ids = torch.tensor([x + [x[-1]] * (T - len(x)) for x in chunk], device=device)
            lengths = torch.tensor([len(x) for x in chunk], device=device)
            batch["mask"] = torch.arange(T, device=device)[None] < lengths[:, None]
            batch["lengths"] = lengths
            try:  # right padding: a causal model's real tokens never see the pad tokens
                model.base_model(input_ids=input_ids, attention_mask=batch["mask"].long(),
                                 use_cache=False)
            except StopForward:
                pass
            out[rows] = torch.cat([pooled[layer] for layer in layers], dim=1).cpu().numpy()
            bar.update(len(rows))
    bar.close()
    return out


@torch.no_grad()
def token_activations(model, tokenizer, texts: Sequence[str], neuron: NeuronId,
                      max_tokens: int = 64) -> list[tuple[list[str], list[float]]]:
    """Per text, its tokens (as strings) and the neuron's activation at each token."""
    device = next(model.parameters()).device
    out = []
    seen: list[torch.Tensor] = []

    def grab(_layer: int, acts: torch.Tensor) -> None:
        seen.append(acts[0, :, neuron.index].float().cpu())
        raise StopForward

    with neuron_hooks(model, [neuron.layer], grab):
        for ids in encode(tokenizer, texts, max_tokens):
            seen.clear()
            try:
                model.base_model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            except StopForward:
                pass
            out.append(([tokenizer.decode([i]) for i in ids], seen[0].tolist()))
    return out
