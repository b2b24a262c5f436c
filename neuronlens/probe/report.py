"""The probe's report: the data-efficiency plot (PNG) and report.md, both from probe.json's dict."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np


def curve_points(curve: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    """Sizes, mean and standard deviation over the draws of one curve."""
    by_n = defaultdict(list)
    for row in curve:
        by_n[row["n"]].append(row[key])
    sizes = sorted(by_n)
    return sizes, [float(np.mean(by_n[n])) for n in sizes], [float(np.std(by_n[n])) for n in sizes]


def plot_curve(curve: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, label in (("l1", "all neurons, L1 logistic"), ("single", "best single neuron")):
        sizes, mean, sd = curve_points(curve, key)
        ax.errorbar(sizes, mean, yerr=sd, marker="o", capsize=3, label=label)
    ax.axhline(result["majority_test_accuracy"], color="grey", ls=":", label="majority class")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("labelled training texts")
    ax.set_ylabel("test accuracy")
    subject = Path(str(result["subject"])).name  # a model directory's name, not its whole path
    ax.set_title(f"{subject}: accuracy vs labels ({result['pooling']} pooling)", fontsize=10)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or " "


def _neuron(row: dict) -> str:
    return f"L{row['layer']}/N{row['index']}"


def _top_table(top: list[dict]) -> list[str]:
    lines = ["| neuron | weight | alone: test acc | mean act. concept / other | explanation | score |",
             "|---|---|---|---|---|---|"]
    for t in top:
        score = "" if t.get("score") is None else f"{t['score']:.3f}"
        text = t.get("explanation") or t.get("error") or ""
        lines.append(f"| {_neuron(t)} | {t['weight']:+.3f} | {t['single_test_accuracy']:.3f} | "
                     f"{t['mean_concept']:.3f} / {t['mean_other']:.3f} | {_cell(text)} | {score} |")
    return lines


def _steering(steering: dict) -> list[str]:
    who = ", ".join(f"L{layer}/N{index}" for layer, index in steering["neurons"])
    rows = steering["rows"]
    base = rows[0]["p_concept"]
    lines = [f"Neurons clamped: {who}, at every token of prompt and generation. P(concept) is the "
             "probe's own probability on the generated continuations, read without the clamp.", "",
             "| clamp value | mean P(concept) | ± s.e. | vs unsteered, paired [95% CI] | Wilcoxon p "
             "| texts |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = "unsteered" if r["value"] is None else f"{r['value']:g}"
        vs, p = f"{r['p_concept'] - base:+.3f}", "—"
        if r.get("vs_unsteered"):   # text by text: same prompt and sampling seed
            e = r["vs_unsteered"]
            vs += " [—]" if e["ci"] is None else f" [{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}]"
            p = "—" if e["wilcoxon_p"] is None else f"{e['wilcoxon_p']:.2g}"
        lines.append(f"| {value} | {r['p_concept']:.3f} | {r['sem']:.3f} | {vs} | {p} | {r['n']} |")
    heads = ["prompt"] + ["unsteered" if r["value"] is None else f"clamp {r['value']:g}" for r in rows]
    lines += ["", "Generations side by side (first sample of each prompt):", "",
              "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for prompt in dict.fromkeys(g["prompt"] for g in rows[0]["generations"]):
        cells = [next(g for g in r["generations"] if g["prompt"] == prompt and g["sample"] == 0)
                 for r in rows]
        lines.append(f"| {_cell(prompt)} | " + " | ".join(
            f"{_cell(g['text'])} (P={g['p_concept']:.2f})" for g in cells) + " |")
    return lines


def markdown(r: dict) -> str:
    d, s = r["data"], r["single_neuron"]
    layers = r["layers"]
    span = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else layers
    lines = [
        f"# Concept neurons of {r['subject']}", "",
        f"Command: `{r['command']}`", "",
        f"Data: train {d['train']['n']} texts ({d['train']['n_concept']} with the concept), valid "
        f"{d['valid']['n']}, test {d['test']['n']}; concept = label {d['classes'][1]!r}."
        + "".join(f" {n[0].upper() + n[1:]}." for n in d["notes"]), "",
        f"Features: {r['n_neurons']} MLP neurons of layers {span}, {r['pooling']}-pooled over each "
        f"text's first {r['max_tokens']} tokens, standardised on train.", "",
        "## Headline", "",
        "| | test accuracy |", "|---|---|",
        f"| L1 logistic regression over all neurons (C={r['C']:g} chosen on valid; "
        f"{r['n_nonzero']} non-zero weights) | {r['test_accuracy']:.3f} |",
        f"| best single neuron L{s['layer']}/N{s['index']} alone (threshold "
        f"{s['threshold']:.3g} fitted on train, neuron chosen on valid) | "
        f"{r['single_neuron_test_accuracy']:.3f} |",
        f"| majority class | {r['majority_test_accuracy']:.3f} |", "",
        "## Data efficiency", "",
        "![accuracy vs labelled examples](curve.png)", "",
        "Test accuracy against the number of labelled training texts (mean ± sd over random "
        "stratified draws), each point using its n texts alone: L1 with C chosen on a "
        "stratified third of them, then refitted on all n; single neuron: chosen and "
        "thresholded on the n texts.", "",
        "| n | L1, all neurons | single neuron |", "|---|---|---|",
    ]
    sizes, l1, l1_sd = curve_points(r["curve"], "l1")
    _, one, one_sd = curve_points(r["curve"], "single")
    lines += [f"| {n} | {a:.3f} ± {sa:.3f} | {b:.3f} ± {sb:.3f} |"
              for n, a, sa, b, sb in zip(sizes, l1, l1_sd, one, one_sd)]
    lines += ["", "## Top neurons by weight", "",
              "Weight on standardised activations (positive: more activation, more concept). "
              "Explanations and scores (correlation of simulated with true activations on held-out "
              "excerpts) come from the `neuronlens` pipeline, run on the neurons' top excerpts of "
              "the configured corpus.", ""] + _top_table(r["top_neurons"])
    lines += ["", "## Trace", "",
              f"[trace.html](trace.html): neuron L{r['trace_neuron'][0]}/N{r['trace_neuron'][1]} at "
              "every token of test texts (red negative, green positive)."]
    if r["steering"]:
        lines += ["", "## Steering", ""] + _steering(r["steering"])
    lines += ["", "## Time", "", f"{r['wall_seconds']:.0f} s in the run (elapsed at the end of each "
              f"stage: {', '.join(f'{k} {v:.0f} s' for k, v in r['timings'].items())}).", ""]
    return "\n".join(lines)
