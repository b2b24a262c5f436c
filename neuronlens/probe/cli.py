"""The `neuronlens-probe` command: a Hydra app over neuronlens/conf/probe.yaml, which composes the same
subject, corpus, explainer and simulator groups as `neuronlens`."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from neuronlens.conf import CONF_DIR
from neuronlens.cli import check_output_dir, fail_cleanly, quiet_http_logs


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="probe")
def app(cfg: DictConfig) -> None:
    from neuronlens.probe.run import run

    quiet_http_logs()
    hc = HydraConfig.get()
    command = " ".join(["neuronlens-probe", *hc.overrides.task])
    fail_cleanly(lambda: run(cfg, Path(hc.runtime.output_dir), command))


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


def main() -> None:
    from neuronlens.help import help_text, wants_help

    if wants_help(sys.argv[1:]):
        print(help_text("neuronlens-probe", "probe", ABOUT, EXAMPLES,
                        ("subject", "corpus", "explainer", "simulator")))
        return
    check_output_dir(sys.argv[1:], "neuronlens-probe")
    app()
