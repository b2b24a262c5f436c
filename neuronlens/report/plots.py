"""The report's figures (matplotlib, Agg backend, PNG): means with intervals, score by layer, and
score histograms. Results are named by their id (R1, R2, ...) plus explainer and judge, coloured by
subject, so that twenty results stay legible."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from neuronlens import stats  # noqa: E402
from neuronlens.report.content import Figure  # noqa: E402
from neuronlens.report.results import Result  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _name(results: list[Result], r: Result, width: int = 48) -> str:
    text = f"R{results.index(r) + 1} {r.explainer} | {r.judge}" + (f" | {r.setting}" if r.setting else "")
    return text if len(text) <= width else text[:width - 1] + "…"


def _metric(results: list[Result]) -> str:
    """What the scores plotted are: the results' one metric, or a word for several."""
    metrics = {r.metric for r in results}
    return metrics.pop() if len(metrics) == 1 else "score (each judge's metric)"


def _colours(results: list[Result]) -> dict[str, tuple]:
    subjects = list(dict.fromkeys(r.subject for r in results))
    cmap = plt.get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(subjects)}


def means(results: list[Result]) -> Figure:
    colours = _colours(results)
    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.32 * len(results)))
    for y, r in enumerate(results):
        s = stats.summarise(r.scores())
        if s.mean is None:
            continue
        err = None if s.mean_ci is None else [[s.mean - s.mean_ci.low], [s.mean_ci.high - s.mean]]
        ax.barh(y, s.mean, xerr=err, color=colours[r.subject], alpha=0.8, capsize=3,
                hatch="//" if r.kind == "baseline" else None)
    ax.set_yticks(range(len(results)), [_name(results, r) for r in results], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"mean test {_metric(results)} (95% bootstrap CI)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.6 / len(results) - 0.08))
    return Figure("means.png", f"Mean test {_metric(results)} per result, with 95% bootstrap intervals "
                  "(hatched: baselines).",
                  _png(fig))


def by_layer(results: list[Result]) -> Figure:
    """One panel per subject: each result's mean per layer, with its interval."""
    subjects = list(dict.fromkeys(r.subject for r in results))
    fig, axes = plt.subplots(len(subjects), 1, figsize=(6.5, 3.6 * len(subjects)), squeeze=False)
    fig.subplots_adjust(hspace=0.4)  # legends sit right of the axes; savefig's tight box takes them in
    cmap = plt.get_cmap("tab20")
    for ax, subject in zip(axes[:, 0], subjects):
        members = [r for r in results if r.subject == subject]
        layers = sorted({n.layer for r in members for n in r.neurons.values()})
        width = 0.6 / len(members)
        for i, r in enumerate(members):
            xs, ys, lo, hi = [], [], [], []
            for j, layer in enumerate(layers):
                s = stats.summarise([n.score for n in r.neurons.values() if n.layer == layer and n.score is not None])
                if s.mean is None:
                    continue
                xs.append(j - 0.3 + width * (i + 0.5))
                ys.append(s.mean)
                lo.append(s.mean - (s.mean_ci.low if s.mean_ci else s.mean))
                hi.append((s.mean_ci.high if s.mean_ci else s.mean) - s.mean)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-" if len(layers) > 1 else "o", markersize=4, capsize=2,
                        color=cmap(i % 20), label=_name(results, r, 40), linewidth=1, elinewidth=0.8)
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"mean test {_metric(members)}")
        ax.set_title(subject, fontsize=9)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(members) <= 14 else 2)
    return Figure("by_layer.png", f"Mean test {_metric(results)} by layer, per subject and result (95% bootstrap "
                  "intervals).", _png(fig))


def histograms(results: list[Result]) -> Figure:
    cols = min(4, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows), sharex=True, squeeze=False)
    colours = _colours(results)
    bins = [x / 10 for x in range(-10, 11)]
    for ax, r in zip(axes.flat, results):
        scores = r.scores()
        ax.hist(scores, bins=bins, color=colours[r.subject], alpha=0.85)
        if scores:
            ax.axvline(sum(scores) / len(scores), color="black", linewidth=1)
        ax.set_title(_name(results, r, 34), fontsize=7)
        ax.tick_params(labelsize=7, labelbottom=True)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    for ax in axes.flat[max(0, len(results) - cols):len(results)]:
        ax.set_xlabel(f"test {_metric(results)}", fontsize=7)
    fig.tight_layout()
    return Figure("histograms.png", f"Distribution of per-neuron test {_metric(results)} per result (line: mean).",
                  _png(fig))
