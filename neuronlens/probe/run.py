"""The `neuronlens-probe` run: labelled texts -> pooled neuron activations -> L1 probe and best
single neuron -> data-efficiency curve -> the top neurons explained and scored by the same pipeline
as `neuronlens` -> per-token traces -> steering -> probe.json, report.md, curve.png, trace.html.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from neuronlens.files import dumps, write_atomic, write_json
from neuronlens.pipeline import build_roles, prepare_explainer, process, table
from neuronlens.probe import report, trace
from neuronlens.probe.activations import columns, pooled_activations, token_activations
from neuronlens.probe.data import Dataset, load
from neuronlens.probe.fit import (L1Probe, Threshold, best_single, curve_sizes, data_efficiency,
                                  fit_l1, thresholds)
from neuronlens.probe.steer import parse_neurons, steering_effect
from neuronlens.records import NeuronId
from neuronlens.subject.hooks import check_neuron, hook_point, n_layers
from neuronlens.subject.transformer import recording_for
from neuronlens.models import load_model

log = logging.getLogger(__name__)


def probe_layers(model, layers) -> list[int]:
    """The layers asked for (null: all), each checked to exist and be hookable."""
    chosen = list(range(n_layers(model))) if layers is None else list(dict.fromkeys(layers))
    for layer in chosen:
        hook_point(model, int(layer))  # a clear error for a bad layer or an unsupported model
    return [int(x) for x in chosen]


def checked(model, spec, key: str) -> list[NeuronId] | None:
    """Neurons named on the command line ([L, I] or [[L, I], ...]), checked before any work."""
    if spec is None:
        return None
    neurons = parse_neurons(spec, key)
    for n in neurons:
        hook_point(model, n.layer)
        check_neuron(model, n.index)
    return neurons


def roles(cfg: DictConfig):
    """Explainer, simulator and second judges, built and checked up front as `neuronlens` does
    (or None)."""
    return build_roles(cfg) if cfg.probe.explain >= 1 else None


def top_neurons(probe: L1Probe, neurons: list[NeuronId], data: Dataset, X: dict, k: int) -> list[dict]:
    """The neurons of largest |weight|, each with its own single-neuron accuracy and class means."""
    cols = probe.top(k)
    acc, thr, sign = thresholds(X["train"][:, cols], data.train.labels)
    out = []
    for n, j in enumerate(cols):
        alone = Threshold(n, float(thr[n]), int(sign[n]), float(acc[n]))
        x = X["train"][:, j]
        out.append({"layer": neurons[j].layer, "index": neurons[j].index,
                    "weight": float(probe.weights[j]),
                    "single_test_accuracy": alone.accuracy(X["test"][:, cols], data.test.labels),
                    "mean_concept": float(x[data.train.labels == 1].mean()),
                    "mean_other": float(x[data.train.labels == 0].mean())})
    return out


def explain_top(cfg, model, tokenizer, top: list[dict], built, run_dir: Path) -> None:
    """Record the top neurons over the configured corpus, then explain, simulate and score each
    exactly as `neuronlens` does; the rows go to neurons.jsonl and into ``top``."""
    chosen = top[:cfg.probe.explain]
    neurons = [NeuronId(t["layer"], t["index"]) for t in chosen]
    explainer, simulator, judges = built
    recording = recording_for(cfg.subject.model, model, tokenizer, neurons, instantiate(cfg.corpus),
                              cfg.recording, cfg.seed, run_dir, cfg.progress)
    records = list(recording.neuron_records())
    prepare_explainer(explainer, records, cfg)
    rows = [process(r, explainer, simulator, cfg, judges) for r in records]
    write_atomic(run_dir / "neurons.jsonl", "".join(dumps(r) + "\n" for r in rows))
    for t, row in zip(chosen, rows):
        t.update(explanation=row.get("explanation"), score=row.get("score"), error=row.get("error"))
    print(table(rows))


def trace_page(cfg, model, tokenizer, data: Dataset, neuron: NeuronId, classes) -> str:
    """Per-token traces of ``neuron`` over the given texts, or test texts from both classes."""
    t = cfg.probe.trace
    if t.texts:
        texts, captions = list(t.texts), ["" for _ in t.texts]
    else:
        by_class = [[i for i, y in enumerate(data.test.labels) if y == c] for c in (1, 0)]
        picks = [i for pair in zip(*(b[:(t.n_texts + 1) // 2] for b in by_class)) for i in pair]
        texts = [data.test.texts[i] for i in picks[:t.n_texts]]
        captions = [f"label {classes[int(data.test.labels[i])]}" for i in picks[:t.n_texts]]
    traces = token_activations(model, tokenizer, texts, neuron, cfg.probe.max_tokens)
    return trace.render(f"Neuron {neuron}", f"Label {classes[1]!r} is the concept.", traces, captions)


def run(cfg: DictConfig, run_dir: Path, command: str = "neuronlens-probe") -> dict[str, Any]:
    start, timings = time.perf_counter(), {}
    clock = lambda name: timings.__setitem__(name, round(time.perf_counter() - start, 1))  # noqa: E731
    run_dir.mkdir(parents=True, exist_ok=True)
    p = cfg.probe
    model, tokenizer = load_model(cfg.subject.model, cfg.subject.device, cfg.subject.dtype)
    layers = probe_layers(model, p.layers)
    data = load(p, cfg.seed)
    built = roles(cfg)
    steer_neurons = checked(model, cfg.steer.neuron, "steer.neuron")
    traced = (checked(model, p.trace.neuron, "probe.trace.neuron") or [None])[0]
    clock("setup")

    acts = lambda texts, progress=cfg.progress: pooled_activations(  # noqa: E731
        model, tokenizer, texts, layers, p.pooling, p.max_tokens, p.batch_size, progress)
    X = {"train": acts(data.train.texts), "valid": acts(data.valid.texts)}
    X["test"] = X["valid"] if data.test is data.valid else acts(data.test.texts)
    clock("activations")
    neurons = columns(model, layers)
    probe = fit_l1(X["train"], data.train.labels, X["valid"], data.valid.labels, p.Cs, cfg.seed)
    single = best_single(X["train"], data.train.labels, X["valid"], data.valid.labels)
    top = top_neurons(probe, neurons, data, X, max(p.top, p.explain))
    curve = data_efficiency(X["train"], data.train.labels, X["test"], data.test.labels, p.Cs,
                            curve_sizes(len(data.train), p.curve.sizes), p.curve.seeds, cfg.seed)
    clock("probe")
    if built is not None and top:
        explain_top(cfg, model, tokenizer, top, built, run_dir)
    clock("explain")
    first = NeuronId(top[0]["layer"], top[0]["index"]) if top else neurons[single.column]
    traced = traced or first
    write_atomic(run_dir / "trace.html", trace_page(cfg, model, tokenizer, data, traced, data.classes))
    steering = None
    values = list(cfg.steer["values"])  # not .values: that is DictConfig's own method
    if values:
        steered = steer_neurons or [first]
        rows = steering_effect(model, tokenizer, steered, values, list(cfg.steer.prompts),
                               cfg.steer.seeds, lambda texts: probe.proba(acts(texts, False)),
                               cfg.steer.max_new_tokens, cfg.steer.temperature, cfg.seed)
        steering = {"neurons": [[n.layer, n.index] for n in steered], "rows": rows}
    clock("trace_and_steer")

    result = figures(probe, single, neurons, data, X) | {
        "top_neurons": top, "curve": curve, "steering": steering,
        "trace_neuron": [traced.layer, traced.index], "data": data.describe(), "layers": layers,
        "pooling": p.pooling, "max_tokens": p.max_tokens, "subject": cfg.subject.model,
        "command": command, "timings": timings, "wall_seconds": round(time.perf_counter() - start, 1),
    }
    write_json(run_dir / "probe.json", result, indent=1)
    report.plot_curve(curve, result, run_dir / "curve.png")
    write_atomic(run_dir / "report.md", report.markdown(result))
    print(f"test accuracy {result['test_accuracy']:.3f} with {result['n_nonzero']} neurons "
          f"(C={probe.C:g}); best single neuron {neurons[single.column]}: "
          f"{result['single_neuron_test_accuracy']:.3f} -> {run_dir}")
    return result


def figures(probe: L1Probe, single: Threshold, neurons: list[NeuronId], data: Dataset,
            X: dict) -> dict[str, Any]:
    """The headline numbers of probe.json."""
    s = neurons[single.column]
    return {
        "test_accuracy": probe.accuracy(X["test"], data.test.labels),
        "valid_accuracy": probe.valid_accuracy,
        "train_accuracy": probe.accuracy(X["train"], data.train.labels),
        "C": probe.C, "n_nonzero": int(np.count_nonzero(probe.weights)), "n_neurons": len(neurons),
        "single_neuron_test_accuracy": single.accuracy(X["test"], data.test.labels),
        "single_neuron": {"layer": s.layer, "index": s.index, "threshold": single.threshold,
                          "sign": single.sign, "train_accuracy": single.train_accuracy,
                          "valid_accuracy": single.accuracy(X["valid"], data.valid.labels)},
        "majority_test_accuracy": float(max(data.test.labels.mean(), 1 - data.test.labels.mean())),
    }
