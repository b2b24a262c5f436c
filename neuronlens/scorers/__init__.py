"""Scorers: an explanation and excerpts in, predictions and a score in the scorer's declared
metric out (``base``): the simulation engine (``simulation``, ``strategies``), the similarity
judge (``similarity``), the correlation scores (``correlation``) and judge power on control
neurons (``judge_power``)."""

from neuronlens.lazy import exports

__all__, __getattr__ = exports(__name__, {
    "Calibration": "correlation",
    "Failure": "base",
    "Metric": "base",
    "Predicted": "base",
    "Scored": "base",
    "ScoredSimulation": "correlation",
    "Scorer": "base",
    "SimilarityJudge": "similarity",
    "SimulationResult": "base",
    "Simulator": "simulation",
})
