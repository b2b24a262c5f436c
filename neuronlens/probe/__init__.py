"""Concept neurons (`neuronlens-probe`): find the MLP neurons that encode a labelled concept with a
sparse linear probe, explain them with the `neuronlens` pipeline, trace them, and steer with them."""

from neuronlens.lazy import exports

__all__, __getattr__ = exports(__name__, {
    "DataError": "data",
    "Dataset": "data",
    "L1Probe": "fit",
    "Split": "data",
    "Threshold": "fit",
})
