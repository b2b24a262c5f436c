"""The `neuronlens-probe` command: a Hydra app over conf/probe.yaml, which composes the same
subject, corpus, explainer and simulator groups as `neuronlens`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from neuronlens.cli import CONF_DIR, check_output_dir, fail_cleanly


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="probe")
def app(cfg: DictConfig) -> None:
    from neuronlens.probe.run import run

    logging.getLogger("httpx").setLevel(logging.WARNING)
    hc = HydraConfig.get()
    command = " ".join(["neuronlens-probe", *hc.overrides.task])
    fail_cleanly(lambda: run(cfg, Path(hc.runtime.output_dir), command))


def main() -> None:
    if not CONF_DIR.is_dir():
        sys.exit(f"neuronlens-probe: error: no config folder at {CONF_DIR}; install with "
                 "`pip install -e .` from a checkout of the repository.")
    check_output_dir(sys.argv[1:], "neuronlens-probe")
    app()
