"""The output side of a unit: the tokens its output direction promotes and suppresses.

A unit writes ``activation x w`` into the residual stream, where ``w`` is its column of the
MLP's output projection (a neuron) or its row of the decoder (an SAE or transcoder latent). Read straight through the final norm's weight and the unembedding,
``w`` gives a logit change per token: ``W_U (g * w)``. This is the direct path only, as
Neuronpedia's top logits are: it ignores the norm's division by the residual's scale (the same
for every token, so the order is kept), the norm's bias where it has one, and every later layer.
A Gemma RMSNorm scales by ``1 + g``.
"""

from __future__ import annotations

import torch
from torch import nn

from neuronlens.subject.hooks import decoder

N_LOGITS = 10
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


def output_direction_weights(model: nn.Module, point: str) -> torch.Tensor:
    """The output projection at ``point`` (a hook point's module) as [width, hidden]: row i is
    neuron i's direction in the residual stream."""
    proj = model.get_submodule(point)
    weight = proj.weight.detach()
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
    return weight if type(proj).__name__ == "Conv1D" else weight.T


def final_norm_scale(model: nn.Module) -> torch.Tensor | None:
    text = decoder(model)
    norm = next((getattr(text, n) for n in FINAL_NORMS if isinstance(getattr(text, n, None), nn.Module)),
                None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    weight = weight.detach()
    return 1 + weight if "Gemma" in type(norm).__name__ else weight


@torch.no_grad()
def direction_logits(model: nn.Module, tokenizer, directions: torch.Tensor, indices: list[int],
                     k: int = N_LOGITS) -> dict[int, dict[str, list]]:
    """Per unit index: ``{"promoted": [[token, logit], ...], "suppressed": [...]}``, ``k`` each,
    the direct-path logit change per unit of activation (see the module's docstring) of the
    residual-stream ``directions`` [units, hidden], one per index."""
    directions = directions.to(model.get_output_embeddings().weight.device).float()
    scale = final_norm_scale(model)
    if scale is not None:
        directions = directions * scale.float()
    unembed = model.get_output_embeddings().weight.detach().float()          # [vocab, hidden]
    logits = directions @ unembed.T                                            # [n, vocab]
    top, bottom = logits.topk(k, dim=-1), (-logits).topk(k, dim=-1)

    def named(values, ids, sign: float) -> list:
        return [[tokenizer.decode([int(t)]), round(sign * float(v), 4)] for v, t in zip(values, ids)]

    return {i: {"promoted": named(top.values[n], top.indices[n], 1.0),
                "suppressed": named(bottom.values[n], bottom.indices[n], -1.0)}
            for n, i in enumerate(indices)}
