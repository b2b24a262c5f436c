"""Steering: generate with one or more neurons overwritten to a fixed value, and measure the effect
with the probe itself.

The overwrite is a hook on the same activation the recorder and the probe read (`neuron_hooks`),
at every position of the prompt and of the generated text, as in the sentiment-neuron experiment.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from neuronlens.errors import UserError
from neuronlens.records import NeuronId
from neuronlens.subject.hooks import check_neuron, neuron_hooks


def parse_neurons(spec, key: str = "steer.neuron") -> list[NeuronId]:
    """`[L, I]` or `[[L, I], ...]` from the command line (the override ``key``), as NeuronIds."""
    items = list(spec)
    if items and not hasattr(items[0], "__len__"):  # one [L, I] pair
        items = [items]
    try:
        out = [NeuronId(int(layer), int(index)) for layer, index in items]
    except (TypeError, ValueError) as e:
        raise UserError(f"{key} must be [layer, index] or [[layer, index], ...], not {spec}.") from e
    if not out:
        raise UserError(f"{key} is empty; give [layer, index], or null for the probe's top neuron.")
    return out


@contextmanager
def clamped(model, neurons: Sequence[NeuronId], value: float) -> Iterator[None]:
    """Inside the block, every forward pass sees ``neurons`` set to ``value`` at every token."""
    by_layer: dict[int, list[int]] = {}
    for n in neurons:
        check_neuron(model, n.index)
        by_layer.setdefault(n.layer, []).append(n.index)
    device = next(model.parameters()).device
    index = {layer: torch.tensor(ix, device=device) for layer, ix in by_layer.items()}

    def overwrite(layer: int, acts: torch.Tensor) -> torch.Tensor:
        acts = acts.clone()
        acts[..., index[layer]] = value
        return acts

    with neuron_hooks(model, sorted(by_layer), overwrite):
        yield


@torch.no_grad()
def generate(model, tokenizer, prompt: str, n: int, seed: int, max_new_tokens: int,
             temperature: float) -> list[str]:
    """``n`` sampled continuations of ``prompt`` (the continuation only), reproducible in ``seed``."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         temperature=temperature, top_k=0, max_new_tokens=max_new_tokens,
                         num_return_sequences=n,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


def steering_effect(model, tokenizer, neurons: Sequence[NeuronId], values: Sequence[float],
                    prompts: Sequence[str], seeds: int, score: Callable[[list[str]], np.ndarray],
                    max_new_tokens: int = 24, temperature: float = 1.0, seed: int = 0) -> list[dict]:
    """For unsteered generation and each clamp value: the continuations of every prompt (``seeds``
    samples each, the same sampling seed at every value) and the probe's mean probability of the
    concept over them. ``score`` reads the texts without any clamp."""
    if not prompts:
        raise UserError("steer.prompts is empty; give at least one prompt to continue.")
    if seeds < 1:
        raise UserError(f"steer.seeds must be at least 1, got {seeds}.")
    rows = []
    for value in [None, *values]:
        texts, where = [], []
        with nullcontext() if value is None else clamped(model, neurons, float(value)):
            for p, prompt in enumerate(prompts):
                got = generate(model, tokenizer, prompt, seeds, seed + p, max_new_tokens,
                               temperature)
                texts += got
                where += [(prompt, s) for s in range(len(got))]
        probs = score(texts)
        row = {"value": value, "p_concept": float(np.mean(probs)),
               "sem": float(np.std(probs) / np.sqrt(len(probs))), "n": len(probs),
               "generations": [{"prompt": pr, "sample": s, "text": t, "p_concept": float(q)}
                               for (pr, s), t, q in zip(where, texts, probs)]}
        if rows:   # paired with the unsteered texts: same prompt, same sampling seed
            row["vs_unsteered"] = paired_effect(probs, [g["p_concept"] for g in rows[0]["generations"]])
        rows.append(row)
    return rows


def paired_effect(steered: Sequence[float], unsteered: Sequence[float]) -> dict:
    """The mean of steered minus unsteered P(concept), text by text, with its paired bootstrap
    95% interval and the Wilcoxon signed-rank and paired t p-values."""
    from neuronlens.stats import paired

    p = paired(list(steered), list(unsteered))
    return {"difference": p.mean_diff, "ci": None if p.ci is None else [p.ci.low, p.ci.high],
            "wilcoxon_p": p.wilcoxon_p, "ttest_p": p.ttest_p, "n": p.n}
