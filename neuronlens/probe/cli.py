"""The `neuronlens-probe` command: a Hydra app over conf/probe.yaml (its settings: probe/settings.py), which composes the same
subject, corpus, explainer and simulator groups as `neuronlens`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from neuronlens.cli import Command, fail_cleanly, run_command


def task(cfg: DictConfig, run_dir: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    from neuronlens.cli.main import quiet_http_logs
    from neuronlens.probe.run import run

    quiet_http_logs()
    command = " ".join(["neuronlens-probe", *HydraConfig.get().overrides.task])
    fail_cleanly(lambda: run(cfg, run_dir, command))


ABOUT = """concept neurons. Fits a sparse (L1) logistic probe from every MLP neuron's
activation to a labelled concept (sentiment, say), reports the few neurons that carry it and how
well one neuron alone separates the labels, explains and scores those neurons as `neuronlens` does,
and steers the model by clamping them (Radford et al. 2017's sentiment neuron)."""

EXAMPLES = [
    ("neuronlens-probe probe.train=train.tsv probe.test=dev.tsv probe.text=sentence",
     ".tsv/.csv/.jsonl with a header"),
    ("neuronlens-probe probe.data=hf probe.name=stanfordnlp/sst2 probe.valid=validation "
     "probe.text=sentence", "a HF dataset"),
    ("neuronlens-probe probe.train=t.tsv subject.model=gpt2 probe.layers=[6,7]", "another model"),
    ("neuronlens-probe probe.train=t.tsv probe.explain=0", "probe and steer only"),
    ("neuronlens-probe probe.train=t.tsv explainer=openai explainer.model=gpt-4o",
     "explain the top neurons with another LLM"),
]


PROBE = Command("neuronlens-probe", "probe", ABOUT, EXAMPLES, ("subject", "corpus", "explainer", "simulator"),
                task)


def main() -> None:
    run_command(PROBE)
