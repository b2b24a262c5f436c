"""The `neuronlens` command (also `python -m neuronlens`): a Hydra app over the pipeline."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from neuronlens.conf import CONF_DIR
from neuronlens.errors import UserError
from neuronlens.secrets import install_log_redaction

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


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> None:
    from neuronlens.pipeline import run

    quiet_http_logs()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with logging_redirect_tqdm():   # log lines above the progress bars, never glued to them
        if cfg.get("progress") is False:
            quiet_console()
        summary = fail_cleanly(lambda: run(cfg, run_dir), run_dir)
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


ABOUT = """automated neuron interpretability. Records the text excerpts that make each MLP neuron
of a language model fire, has an LLM explain each neuron in words, has an LLM simulate the neuron
from that explanation alone, and scores the explanation by how well the simulation correlates with
the real activations (Bills et al. 2023). Writes <run dir>/neurons.jsonl and summary.json and
prints a table; `neuronlens-report <run dir>` makes the report and the neuron viewer."""

EXAMPLES = [
    ("neuronlens", "8 neurons of the embedded SmolLM2-135M-Instruct, offline, no key"),
    ("neuronlens subject.model=gpt2 neurons.layers=[5] neurons.per_layer=16", "any HF causal LM"),
    ("neuronlens corpus=files corpus.paths=[notes.txt,more.jsonl]", "excerpts from your own text"),
    ("neuronlens explainer=openai explainer.model=gpt-4o", "reads OPENAI_API_KEY"),
    ("neuronlens simulator=vllm simulator.base_url=http://HOST:8000/v1 simulator.model=NAME",
     "a vLLM server you run"),
    ("neuronlens explainer=top_tokens ~judges", "the baseline, no second judge"),
    ("neuronlens hydra.run.dir=runs/a", "rerun it to resume: finished neurons are kept"),
    ("neuronlens -m +experiment=backend_grid", "a sweep; then neuronlens-report multirun/..."),
]


def main() -> None:
    from neuronlens.help import help_text, wants_help

    if wants_help(sys.argv[1:]):
        print(help_text("neuronlens", "config", ABOUT, EXAMPLES,
                        ("subject", "corpus", "explainer", "simulator", "experiment")))
        return
    check_output_dir(sys.argv[1:])
    app()
