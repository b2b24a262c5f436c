"""Backends: one small interface to a language model, its capabilities declared (``base``); one
module per backend (``local``, ``openai``, ``vllm``, ``litellm``) and the policy layer around the
remote ones (``policy``: cache, retries, concurrency, cost)."""

from neuronlens.lazy import exports

__all__, __getattr__ = exports(__name__, {
    "Backend": "base",
    "BackendError": "base",
    "Capabilities": "base",
    "GenerateRequest": "base",
    "Generation": "base",
    "LiteLLMBackend": "litellm",
    "LocalBackend": "local",
    "OpenAIBackend": "openai",
    "Policy": "policy",
    "PromptLogprobRequest": "base",
    "TokenDistributions": "base",
    "TransientError": "base",
    "Unscorable": "base",
    "Usage": "base",
    "VLLMBackend": "vllm",
    "VLLMEngineBackend": "vllm",
})
