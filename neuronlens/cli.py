"""The `neuronlens` command (also `python -m neuronlens`): a Hydra app over the pipeline."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from neuronlens.errors import UserError
from neuronlens.secrets import install_log_redaction

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger("neuronlens")


def user_error(e: BaseException) -> UserError | None:
    """The UserError behind ``e``, looking through Hydra's instantiation wrapper; a setting the
    config leaves mandatory (``???``) and the command line did not give counts as one too."""
    while e is not None:
        if isinstance(e, UserError):
            return e
        if isinstance(e, MissingMandatoryValue):
            return UserError(f"{e.full_key} must be set, e.g. `{e.full_key}=...` on the command line.")
        e = e.__cause__
    return None


def fail_cleanly(fn):
    """Run ``fn``, with keys redacted from every log line; a UserError becomes one line on
    stderr and exit status 2."""
    install_log_redaction()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - only UserErrors are swallowed, the rest re-raised
        err = user_error(e)
        if err is None:
            raise
        tqdm.write(f"neuronlens: error: {err}", file=sys.stderr)   # on a line of its own, under any bar
        sys.exit(2)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> None:
    from neuronlens.pipeline import run

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request is noise
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with logging_redirect_tqdm():   # log lines above the progress bars, never glued to them
        summary = fail_cleanly(lambda: run(cfg, run_dir))
    if summary["n_neurons"] and summary["n_failed"] == summary["n_neurons"]:
        kinds = ", ".join(f"{k} {n}" for k, n in summary["failures_by_kind"].items())
        print(f"neuronlens: error: all {summary['n_neurons']} neurons failed ({kinds}); the reasons are "
              f"in {run_dir / 'neurons.jsonl'}, and the same command redoes the transient ones.",
              file=sys.stderr)
        sys.exit(1)


def check_output_dir(argv: list[str], command: str = "neuronlens") -> None:
    """Exit with one line when the run's output folder cannot be written (Hydra creates it, with
    a traceback, before any of our code runs). Checked: a literal ``hydra.run.dir`` /
    ``hydra.sweep.dir`` from the command line, else the default ``outputs``/``multirun`` here."""
    if any(a in argv for a in ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg",
                               "--shell-completion", "-sc")):
        return   # nothing will be written
    multirun = "-m" in argv or "--multirun" in argv
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [a.split("=", 1)[1] for a in argv if a.startswith(key)]
    target = Path(given[-1] if given else ("multirun" if multirun else "outputs")).expanduser()
    if "${" in str(target):
        return
    existing = next(p for p in (target, *target.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK) or not existing.is_dir():
        sys.exit(f"{command}: error: cannot write the output folder {target} ({existing} is not a "
                 "writable folder); choose one with hydra.run.dir=...")


def main() -> None:
    if not CONF_DIR.is_dir():
        sys.exit(f"neuronlens: error: no config folder at {CONF_DIR}; install with `pip install -e .`"
                 " from a checkout of the repository.")
    check_output_dir(sys.argv[1:])
    app()
