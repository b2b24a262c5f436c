"""The `neuronlens-sae` command: a Hydra app over conf/sae.yaml (its settings: sae/settings.py),
which composes the same subject and corpus groups as `neuronlens`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from neuronlens.cli import Command, fail_cleanly, run_command


def task(cfg: DictConfig, run_dir: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    from neuronlens.sae.train import run

    command = " ".join(["neuronlens-sae", *HydraConfig.get().overrides.task])
    summary = fail_cleanly(lambda: run(cfg, run_dir, command))
    print(f"SAE of {summary['latents']} latents (k {summary['k']}) on {summary['hookpoint']}: "
          f"{summary['fraction_of_variance_explained']:.3f} of the variance explained (all but each window's "
          f"first token), {summary['dead_latents']} dead latents, {summary['train_minutes']:.1f} min. "
          f"Interpret it: neuronlens subject=sae subject.path={summary['path']}")


ABOUT = """an SAE for the subject model, trained here. Trains a top-k sparse autoencoder on the
residual stream after one layer with EleutherAI's sparsify (the `sae` extra), over the corpus,
and measures the fraction of variance it explains and its dead latents. Its latents are then
interpreted like neurons: `neuronlens subject=sae subject.path=<run dir>/sae`."""

EXAMPLES = [
    ("neuronlens-sae", "the embedded model's middle layer, on the built-in corpus (offline)"),
    ("neuronlens-sae sae.layer=20 sae.expansion_factor=16 sae.k=16", "another layer and width"),
    ("neuronlens-sae subject.model=gpt2 corpus=files corpus.paths=[text.jsonl]", "another model and text"),
    ("neuronlens-sae sae.epochs=2 sae.max_windows=300", "a quick one, to try the path"),
    ("neuronlens-sae hydra.run.dir=runs/sae && neuronlens subject=sae subject.path=runs/sae/sae",
     "train, then interpret its latents"),
]

SAE = Command("neuronlens-sae", "sae", ABOUT, EXAMPLES, ("subject", "corpus"), task)


def main() -> None:
    run_command(SAE)
