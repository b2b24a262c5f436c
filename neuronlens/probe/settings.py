"""The `neuronlens-probe` command's settings, typed once: everything of the `neuronlens` command
(:class:`neuronlens.settings.RunSettings`) plus the ``probe`` and ``steer`` blocks, registered as the
schema of ``conf/probe.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from neuronlens.settings import RunSettings, register, setting


@dataclass
class Curve:
    """Data efficiency: the probe refitted on growing labelled subsets."""

    sizes: Optional[List[int]] = setting(None, "labelled-example counts; null: 8, 16, 32, ... up to all of "
                                               "train", low=1)
    seeds: int = setting(3, "random draws per count", low=1)


@dataclass
class Trace:
    """One neuron's activation traced over a few texts, token by token."""

    neuron: Optional[List[int]] = setting(None, "[layer, index] to trace; null: the top neuron", low=0)
    texts: List[str] = setting([], "texts to trace; empty: n_texts test texts, half of each class")
    n_texts: int = setting(6, "test texts traced when texts is empty", low=1)


@dataclass
class Probe:
    """The labelled data and the sparse (L1) probe fitted on it."""

    data: str = setting("files", "where the labelled texts come from", choices=("files", "hf"))
    train: Optional[str] = setting(None, "files: a .tsv / .csv (header line) or .jsonl file; hf: a split "
                                         "name (null: train)")
    valid: Optional[str] = setting(None, "as train; null: hold out valid_fraction of train")
    test: Optional[str] = setting(None, "as train; null: the validation split is also the test split")
    name: Optional[str] = setting(None, "hf: the dataset, e.g. stanfordnlp/sst2")
    config: Optional[str] = setting(None, "hf: the dataset's config name, if it has several")
    text: str = setting("text", "the column holding the text")
    label: str = setting("label", "the column holding the label; exactly two values in train")
    positive: Optional[str] = setting(None, "the label value that is the concept; null: the larger one "
                                            "(1 of 0/1)")
    valid_fraction: float = setting(0.2, "held out of train when valid is null", low=0)
    max_train: Optional[int] = setting(None, "random subsample of train (null: all)", low=1)
    max_valid: Optional[int] = setting(None, "random subsample of valid (null: all)", low=1)
    max_test: Optional[int] = setting(None, "random subsample of test (null: all)", low=1)
    layers: Optional[List[int]] = setting(None, "layers whose neurons are features; null: every layer", low=0)
    pooling: str = setting("mean", "one number per text and neuron", choices=("mean", "max", "last"))
    max_tokens: int = setting(64, "a text's first N tokens", low=1)
    batch_size: int = setting(32, "texts per forward pass", low=1)
    Cs: List[float] = setting([0.01, 0.03, 0.1, 0.3, 1.0], "L1 strengths tried (on standardised "
                                                           "activations); the best on valid is kept", low=0)
    top: int = setting(10, "neurons listed by |weight| in the report", low=1)
    explain: int = setting(5, "top neurons recorded over `corpus`, explained, simulated, scored (0: none)",
                           low=0)
    curve: Curve = field(default_factory=Curve)
    trace: Trace = field(default_factory=Trace)


@dataclass
class Steer:
    """Steering: the model's generations with a neuron clamped."""

    neuron: Any = setting(None, "[layer, index] or [[layer, index], ...]; null: the probe's top neuron")
    values: List[float] = setting([-8, 0, 8], "clamp values, each compared with unsteered generation; [] "
                                              "skips steering")
    prompts: List[str] = setting(["The movie was", "I thought this film", "Overall, the story is",
                                  "This restaurant"], "prompts the steered model continues")
    seeds: int = setting(4, "sampled continuations per prompt and value", low=1)
    max_new_tokens: int = setting(24, "tokens generated per continuation", low=1)
    temperature: float = setting(1.0, "sampling temperature", low=0)


@dataclass
class ProbeSettings(RunSettings):
    """Concept neurons: a sparse probe, their explanations, and steering (the `neuronlens-probe` command)."""

    probe: Probe = field(default_factory=Probe)
    steer: Steer = field(default_factory=Steer)


register("probe", "probe_schema", ProbeSettings)
