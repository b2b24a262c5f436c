"""neuronlens' Hydra configs: ``conf/`` at the top of the repository, shipped inside the package as
``neuronlens.conf`` (pyproject.toml's package-dir). One folder per config group (``subject/``,
``corpus/``, ``explainer/``, ``simulator/``, ``experiment/``) and one primary config per command
(``config.yaml``, ``probe.yaml``, ``serve.yaml``), each typed by its schema (``neuronlens/settings.py``,
``neuronlens/probe/settings.py``, ``neuronlens/serve/settings.py``)."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
