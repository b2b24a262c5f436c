"""neuronlens' Hydra configs, shipped inside the package: one folder per config group
(``subject/``, ``corpus/``, ``explainer/``, ``simulator/``, ``experiment/``) and one primary
config per command (``config.yaml``, ``probe.yaml``, ``serve.yaml``)."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
