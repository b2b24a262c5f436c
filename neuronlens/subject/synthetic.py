"""Synthetic neurons: rules over tokens, each with its true explanation.

A rule neuron fires 1.0 on the tokens its rule picks and 0.0 elsewhere, over the same corpus
windows a model would see. Its answer is known, so it tests the judges (a simulator that cannot
score the true explanation cannot judge anyone) and the explainers (how close they get to the
truth's score). Rules are data in ``conf/subject/synthetic.yaml``; each kind below is one small
function of the window's token strings, so a new kind is a few lines. The same rules, recorded on
the built-in corpus, are every run's control neurons (``control_neurons``) for judge power.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from neuronlens.conf import CONF_DIR
from neuronlens.corpus import BuiltinCorpus, Corpus, token_windows
from neuronlens.errors import UserError
from neuronlens.records import NeuronId, NeuronRecord
from neuronlens.subject.base import Subject, pick
from neuronlens.models import load_tokenizer
from neuronlens.subject.recording import Recorder, Recording, RecordingConfig

Rule = Callable[[Sequence[str]], list[float]]
RULES = CONF_DIR / "subject" / "synthetic.yaml"


def _words(words: Sequence[str]) -> Rule:
    wanted = {w.lower() for w in words}
    return lambda toks: [float(t.strip().lower() in wanted) for t in toks]


def _regex(pattern: str) -> Rule:
    rx = re.compile(pattern)
    return lambda toks: [float(bool(rx.fullmatch(t.strip()))) for t in toks]


def _digits() -> Rule:
    return lambda toks: [float(any(c.isdigit() for c in t)) for t in toks]


def _capitalised() -> Rule:
    # a word start (leading space or the window's first token) with an upper-case first letter
    return lambda toks: [float(t.strip()[:1].isupper() and (t[:1].isspace() or i == 0))
                         for i, t in enumerate(toks)]


def _position(first: int) -> Rule:
    return lambda toks: [float(i < first) for i in range(len(toks))]


def _after(words: Sequence[str]) -> Rule:
    before = {w.lower() for w in words}
    return lambda toks: [float(i > 0 and toks[i - 1].strip().lower() in before)
                         for i in range(len(toks))]


KINDS: dict[str, Callable[..., Rule]] = {"words": _words, "regex": _regex, "digits": _digits,
                                          "capitalised": _capitalised, "position": _position,
                                          "after": _after}


def make_rule(spec: dict) -> Rule:
    spec = dict(spec)
    kind = spec.pop("kind", None)
    spec.pop("explanation", None)
    if kind not in KINDS:
        raise UserError(f"Synthetic neuron kind {kind!r} is unknown; use one of {', '.join(KINDS)}.")
    try:
        return KINDS[kind](**spec)
    except (TypeError, re.error) as e:
        raise UserError(f"Synthetic neuron {kind} has bad settings {spec}: {e}.") from e


class SyntheticSubject(Subject):
    """Rule neurons over the corpus's tokens (as ``tokenizer`` cuts them), all on layer 0; neuron
    ``i`` is ``neurons[i]``. ``neurons.layers``/``indices`` filter them; all are used otherwise."""

    name = "synthetic"

    def __init__(self, neurons: Sequence[dict], tokenizer: str = "embedded"):
        if not neurons:
            raise UserError("subject=synthetic needs at least one rule in subject.neurons.")
        self.specs = [OmegaConf.to_container(n) if isinstance(n, DictConfig) else dict(n)
                      for n in neurons]
        for i, spec in enumerate(self.specs):
            if not spec.get("explanation"):
                raise UserError(f"Synthetic neuron {i} ({spec.get('kind')}) has no explanation.")
        self.rules = [make_rule(s) for s in self.specs]
        self.tokenizer_name = tokenizer

    def explanation(self, neuron: NeuronId) -> str:
        """The true explanation of a neuron."""
        return self.specs[neuron.index]["explanation"]

    def activations(self, tokens: Sequence[str]) -> torch.Tensor:
        """[neurons, len(tokens)]: every rule over one window's token strings."""
        return torch.tensor([rule(tokens) for rule in self.rules])

    def select(self, neurons: DictConfig, seed: int) -> list[NeuronId]:
        return pick([NeuronId(0, i) for i in range(len(self.rules))], neurons)

    def records(self, neurons: list[NeuronId], corpus: Corpus, recording: DictConfig, seed: int,
                run_dir: Path, progress: bool = False) -> list[NeuronRecord]:
        target = run_dir / "recording"
        if (saved := Recording.saved(target)) is not None:
            return list(saved.neuron_records())
        tokenizer = load_tokenizer(self.tokenizer_name)
        windows = token_windows(corpus, tokenizer, recording.window, recording.max_windows)
        recorder = Recorder(neurons, RecordingConfig(recording.top_k, recording.n_random,
                                                     recording.batch_size, seed))
        strings: dict[int, str] = {}
        text = lambda i: strings.setdefault(i, tokenizer.decode([i]))
        rows = [n.index for n in neurons]
        windows = iter(windows)
        while batch := list(islice(windows, recording.batch_size)):
            acts = torch.stack([self.activations([text(i) for i in w])[rows] for w in batch], dim=1)
            recorder.add(torch.tensor(batch), acts)
        rec = recorder.finish(text, {"subject": "synthetic", "rules": self.specs})
        rec.save(target)
        return list(rec.neuron_records())


def control_neurons(settings: DictConfig, directory: Path) -> list[tuple[NeuronRecord, str]]:
    """The control neurons of judge power (``judge_power`` settings: ``window``, ``top_k``,
    ``n_random``, ``max_windows``) with their true explanations, recorded once into ``directory``."""
    subject = SyntheticSubject(OmegaConf.load(RULES).neurons)
    recording = OmegaConf.create({"top_k": settings.top_k, "n_random": settings.n_random,
                                  "batch_size": 32, "window": settings.window,
                                  "max_windows": settings.max_windows, "cache": False})
    neurons = [NeuronId(0, i) for i in range(len(subject.rules))]
    records = subject.records(neurons, BuiltinCorpus(), recording, 0, directory)
    return [(r, subject.explanation(r.neuron_id)) for r in records]
