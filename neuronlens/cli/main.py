"""What every Hydra command of neuronlens shares: one ``main`` (``--help``, the output folder,
the config composed and checked, the task run), and the plumbing around it: a user's mistake is one
line and exit status 2, never a traceback, and a failed start leaves no folder behind."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue
from tqdm.auto import tqdm

from neuronlens.conf import CONF_DIR
from neuronlens.errors import UserError
from neuronlens.secrets import install_log_redaction

log = logging.getLogger("neuronlens")


@dataclass(frozen=True)
class Command:
    """A Hydra command: its name, primary config, the words of its ``--help``, the config groups
    that help lists, and its task (the composed, checked config and the run folder in)."""

    name: str
    config_name: str
    about: str
    examples: list[tuple[str, str]]
    groups: tuple[str, ...]
    task: Callable[[DictConfig, Path], None]


def main(command: Command, argv: list[str] | None = None) -> None:
    """Run ``command`` on the command line ``argv`` (default: ``sys.argv[1:]``)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from neuronlens.cli.checks import composition_error, schema_of, with_deletions
    from neuronlens.cli.help import help_text, wants_help
    from neuronlens.settings import check

    argv = sys.argv[1:] if argv is None else argv
    schema = schema_of(command.config_name)
    if wants_help(argv):
        print(help_text(command, schema))
        return
    check_output_dir(argv, command.name)

    def task(cfg: DictConfig) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        fail_cleanly(lambda: check(cfg, schema), run_dir)   # unknown keys, ranges
        command.task(cfg, run_dir)

    app = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=command.config_name)(task)
    sys.argv = [sys.argv[0], *with_deletions(argv, schema)]
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")   # composition errors reach us, not Hydra's page
    try:
        app()
    except Exception as e:  # noqa: BLE001 - only a bad command line is swallowed, the rest re-raised
        err = composition_error(e, command.config_name)
        if err is None:
            raise
        print(f"neuronlens: error: {err}", file=sys.stderr)
        sys.exit(2)


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


def fail_cleanly(fn, run_dir: Path | None = None):
    """Run ``fn``, with keys redacted from every log line; a UserError becomes one line on
    stderr and exit status 2, and a ``run_dir`` it leaves holding no result is removed."""
    install_log_redaction()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - only UserErrors are swallowed, the rest re-raised
        err = user_error(e)
        if err is None:
            raise
        tqdm.write(f"neuronlens: error: {err}", file=sys.stderr)   # on a line of its own, under any bar
        if run_dir is not None:
            discard_if_empty(run_dir)
        sys.exit(2)


# What a run folder holds before its first result: Hydra's record of the config, the log, and ours.
SCAFFOLDING = {".hydra", "experiment.json", ".lock"}


def discard_if_empty(run_dir: Path) -> None:
    """Remove a run folder that a failed start left with no result in it (and the folders above it
    up to the working directory, those left empty), so that bad input leaves nothing behind."""
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    if any(p.name not in SCAFFOLDING and p.suffix != ".log" for p in entries) \
            or Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        return   # it holds results (a run to resume), or it is where we stand: kept
    shutil.rmtree(run_dir, ignore_errors=True)
    here, folder = Path.cwd().resolve(), run_dir.resolve().parent
    while folder != here and folder.is_relative_to(here):   # outputs/<date>/, then outputs/, if empty
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent


def quiet_http_logs() -> None:
    """One INFO line per HTTP request is noise: httpx (and httpx2, which the openai client uses
    from 3.x) log at WARNING and above only."""
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_console() -> None:
    """``progress=false``: the console shows warnings and the results only (the log file keeps
    everything)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    disable_progress_bar()    # transformers' "Loading weights" bar
    disable_progress_bars()   # the hub's download bars


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


