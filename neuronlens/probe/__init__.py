"""Concept neurons (`neuronlens-probe`): find the MLP neurons that encode a labelled concept with a
sparse linear probe, explain them with the `neuronlens` pipeline, trace them, and steer with them."""
