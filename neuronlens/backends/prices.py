"""Dollars per response, from LiteLLM's bundled price table (the same table for every backend:
the OpenAI client, vLLM's and LiteLLM's); LiteLLM is imported here, lazily, for every user of it."""

from __future__ import annotations

import os


def import_litellm():
    """LiteLLM, imported lazily (it is slow to import), with its bundled price table: costs are
    reproducible for a given LiteLLM version and no run reaches out to refresh them."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError as e:
        raise ImportError("The litellm backend needs LiteLLM: pip install litellm") from e
    litellm.suppress_debug_info = True   # no "Give Feedback" banner on every retried error
    return litellm


def priced_model(identity: dict) -> str | None:
    """The model to look up in the price table: only a provider's own endpoint has its prices; a
    self-hosted server (a vLLM or neuronlens-serve ``base_url``) costs what its machine costs."""
    endpoint = identity.get("base_url") or identity.get("api_base")
    if endpoint and "api.openai.com" not in str(endpoint):
        return None
    return identity.get("model")


def price(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """Dollars for one response by LiteLLM's price table; None for a model it does not list."""
    litellm = import_litellm()

    try:
        p, c = litellm.cost_per_token(model=model, prompt_tokens=prompt_tokens,
                                      completion_tokens=completion_tokens)
    except Exception:  # litellm raises several types for an unmapped model
        return None
    return float(p) + float(c)
