"""The `neuronlens` command (also `python -m neuronlens`): record -> explain -> simulate -> score,
a Hydra app over :func:`neuronlens.pipeline.run`."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from neuronlens.cli.main import Command, fail_cleanly, main as run_command, quiet_console, quiet_http_logs


def task(cfg: DictConfig, run_dir: Path) -> None:
    """The pipeline over ``cfg``; exit status 1 when every neuron failed."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from neuronlens.pipeline import run

    quiet_http_logs()
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


NEURONLENS = Command("neuronlens", "config", ABOUT, EXAMPLES,
                     ("subject", "corpus", "explainer", "simulator", "experiment"), task)


def main() -> None:
    run_command(NEURONLENS)
