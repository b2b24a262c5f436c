"""Attention for models run on the CPU: transformers' SDPA, but grouped keys and values (GQA:
SmolLM2, Llama 3, Gemma) go to the kernel as they are, also under an attention mask.

transformers hands grouped K/V to ``scaled_dot_product_attention`` only without a mask (with one,
CUDA kernels would fall back to the slow path) and otherwise copies them once per query head
(``repeat_kv``). The CPU kernel takes grouped K/V with a mask, so the copy only costs time: on
SmolLM2-135M, 8 x 120 tokens after a 1,330-token prefix ran at 340 tokens/s with the copy and 440
without; a neuron's whole simulation (excerpts of ~340 tokens) about 3% faster. The same kernel on
the same values: equal results (tests/test_simulate.py).
"""

from __future__ import annotations

from typing import Any

NAME = "neuronlens_sdpa"


def grouped_sdpa(module: Any, query, key, value, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any):
    """``sdpa`` as transformers calls it (query [B, heads, L, D], key and value [B, kv heads,
    S, D]); returns the output as [B, L, heads, D] and no weights."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = query.shape[1] != key.shape[1]
    if (not grouped or query.device.type != "cpu" or query.shape[2] == 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=bool(causal and attention_mask is None), enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model: Any) -> None:
    """Run ``model`` (loaded with ``sdpa``) with :func:`grouped_sdpa`; its masks stay SDPA's."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
