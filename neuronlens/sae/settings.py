"""The `neuronlens-sae` command's settings, typed once, registered as the schema of
``conf/sae.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from neuronlens.settings import register, setting


@dataclass
class Sae:
    """A top-k SAE on the residual stream after one layer, trained by sparsify's own trainer."""

    layer: Optional[int] = setting(None, "the layer whose output it reads; null: the middle one", low=0)
    expansion_factor: int = setting(8, "latents per dimension of the residual stream", low=1)
    k: int = setting(32, "latents active per token", low=1)
    epochs: int = setting(6, "passes over the corpus, each in a new order", low=1)
    batch_size: int = setting(16, "windows per step", low=1)
    window: int = setting(64, "tokens per window", low=2)
    max_windows: Optional[int] = setting(None, "windows of the corpus (null: all)", low=1)
    lr: Optional[float] = setting(None, "learning rate; null: sparsify's default for the width", low=0)
    auxk_alpha: float = setting(1 / 32, "weight of sparsify's auxiliary loss, which revives dead latents",
                                low=0)
    dead_after: int = setting(20000, "tokens without firing after which sparsify counts a latent dead",
                              low=1)
    seed: int = setting(0, "initialisation and the order of the windows")


@dataclass
class SaeSettings:
    """Train an SAE on the subject model over the corpus (the `neuronlens-sae` command)."""

    subject: Any = MISSING
    corpus: Any = MISSING
    sae: Sae = field(default_factory=Sae)


register("sae", "sae_schema", SaeSettings)
