"""Explainers: a neuron's train excerpts in, candidate explanations out (``base``): an LLM on any
backend (``llm``), the baselines and the truth (``baselines``), or explanations read from a file
(``loaded``)."""

from neuronlens.lazy import exports

__all__, __getattr__ = exports(__name__, {
    "Explainer": "base",
    "ExplanationResult": "base",
    "LLMExplainer": "llm",
    "LoadedExplainer": "loaded",
    "Shuffled": "baselines",
    "TopTokens": "baselines",
    "Truth": "baselines",
})
