"""The neuron viewer: a self-contained HTML site for one run directory.

``write_site(run_dir)`` reads ``neurons.jsonl`` and ``summary.json`` and writes ``viewer/index.html``
(every neuron in a table, sortable by score and by layer, with a search box over the explanations)
and one page per neuron, ``viewer/neurons/L{layer}_N{index}.html``: its explanations, its scores,
and each test excerpt drawn token by token, shaded by the true activation, with the simulated
activation in a strip under each token and the exact values on hover.

Nothing is fetched from elsewhere: CSS and JS are inline, so the site works from ``file://``. All
text from the corpus and the explainer goes through Jinja's autoescape; no data is put in a script.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader

from neuronlens.files import write_atomic
from neuronlens.report.runs import rows_of_run
from neuronlens.summary import LOW_MASS, headline, metric_of, summarise_rows

TEMPLATES = Path(__file__).resolve().parent / "templates"
SIMULATED_SCALE = 10.0  # the simulator predicts on 0-10, 10 meaning the neuron's max activation
POSITIVE, NEGATIVE, SIMULATED, JUDGE = (34, 139, 34), (200, 30, 120), (40, 90, 220), (230, 140, 0)
VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}
REPLACEMENT = "\ufffd"   # what a byte of a split character decodes to alone


def page_name(layer: int, index: int) -> str:
    return f"L{layer}_N{index}.html"


def shade(value: float | None, scale: float, colour: tuple[int, int, int],
          negative: tuple[int, int, int] | None = None) -> str:
    """A CSS background for ``value``: the hue's alpha grows with ``|value| / scale``."""
    if value is None or not math.isfinite(value) or scale <= 0:
        return "transparent"
    rgb = negative if value < 0 and negative else colour
    alpha = min(1.0, abs(value) / scale) if (value >= 0 or negative) else 0.0
    return f"rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha:.3f})"


def show_token(token: str) -> str:
    """A token as drawn: newlines, tabs and CRs as visible marks (spaces stay, in `pre` style)."""
    for raw, mark in VISIBLE.items():
        token = token.replace(raw, mark)
    return token if token else "∅"


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def pieces(tokens: list[str], text: list[str] | None) -> list[tuple[str, list[int]]]:
    """Tokens grouped as drawn, each group with its text: the byte tokens of a split character
    form one group that reads as the character (the recording's ``text``: the character on the
    first, "" on the others); without ``text``, a run of tokens that are U+FFFD alone is one "�"."""
    out: list[tuple[str, list[int]]] = []
    for i, tok in enumerate(tokens):
        if text is not None and i < len(text):
            joins = text[i] == "" and tok != "" and bool(out)
            shown = text[i]
        else:
            joins = tok.strip() == REPLACEMENT and bool(out) and out[-1][0].endswith(REPLACEMENT)
            shown = tok
        if joins:
            out[-1][1].append(i)
        else:
            out.append((shown, [i]))
    return out


def starts_word(token: str) -> bool:
    return not token or token[0].isspace() or not token[0].isalnum()


def _excerpt(ex: dict[str, Any], i: int, scale: float,
             judges: list[tuple[str, list | None, float]]) -> dict[str, Any]:
    """An excerpt as words of tokens: a word starts at a token that begins with a space or a
    symbol, and its tokens are drawn touching (no gap inside "Mitochondria"). A character split
    into byte tokens is one box, its activations their maximum (each on hover)."""
    words: list[list[dict]] = []
    simulated = ex.get("simulated") or []
    for text, piece in pieces(ex["tokens"], ex.get("text")):
        pick = lambda values: max((values[j] for j in piece if j < len(values) and values[j] is not None),  # noqa: E731
                                  default=None, key=abs)
        true, sim = pick(ex["true"]), pick(simulated)
        strips = [{"name": name, "value": pick(vals), "bg": shade(pick(vals), jscale, JUDGE, NEGATIVE)}
                  for name, vals, jscale in judges if vals is not None]
        token = {"text": show_token(text), "newline": "\n" in text,
                 "true": true, "sim": sim, "n_bytes": len(piece) if len(piece) > 1 else 0,
                 "true_bg": shade(true, scale, POSITIVE, NEGATIVE),
                 "sim_bg": shade(sim, SIMULATED_SCALE, SIMULATED, NEGATIVE), "judges": strips}
        if not words or starts_word(text) or words[-1][-1]["newline"]:
            words.append([])
        words[-1].append(token)
    return {"kind": ex.get("kind", ""), "n": i + 1, "words": words,
            "max_true": max(ex["true"], default=0.0)}


HISTOGRAM_BINS = 24


def histogram(excerpts: list[dict[str, Any]], bins: int = HISTOGRAM_BINS) -> dict[str, Any] | None:
    """The neuron's activations over its test tokens, in ``bins`` equal bins, counted apart for
    top and random excerpts (random excerpts show how it behaves on ordinary text)."""
    values = {"top": [a for e in excerpts if e.get("kind") == "top" for a in e["true"]],
              "random": [a for e in excerpts if e.get("kind") != "top" for a in e["true"]]}
    every = [a for v in values.values() for a in v if math.isfinite(a)]
    if not every:
        return None
    lo, hi = min(every), max(every)
    width = (hi - lo) / bins if hi > lo else 1.0
    counts = {kind: [0] * bins for kind in values}
    for kind, vals in values.items():
        for a in vals:
            if math.isfinite(a):
                counts[kind][min(bins - 1, int((a - lo) / width))] += 1
    tallest = max(max(c) for c in counts.values()) or 1
    return {"bins": [{"lo": lo + k * width, "hi": lo + (k + 1) * width, "top": counts["top"][k],
                      "random": counts["random"][k],
                      "top_h": counts["top"][k] / tallest, "random_h": counts["random"][k] / tallest}
                     for k in range(bins)],
            "lo": lo, "hi": hi, "tallest": tallest, "n_top": len(values["top"]),
            "n_random": len(values["random"])}


def judge_table(row: dict[str, Any], simulator: str | None) -> list[dict[str, Any]]:
    """One line per judge of the kept explanation, the run's simulator first: its metric, its score
    on all, top and random test excerpts, digit mass, failed excerpts and flag."""
    def line(name: str, entry: dict[str, Any], failed: Any) -> dict[str, Any]:
        test, metric = ((entry.get("scores") or {}).get("test") or {}), metric_of(entry)
        on = {split: headline(test.get(split), metric) for split in ("all", "top", "random")}
        return {"name": name, "metric": metric, "score": entry.get("score"), **on,
                "mass": (entry.get("mass") or {}).get("mean"), "failed": failed,
                "flag": entry.get("score_flag")}

    if row.get("score") is None and not row.get("judges"):
        return []
    lines = [line(f"simulator ({simulator})" if simulator else "simulator", row,
                  (row.get("failures") or {}).get("excerpts"))]
    lines += [line(name, judge, judge.get("failed_excerpts"))
              for name, judge in (row.get("judges") or {}).items()]
    return lines


def answer_line(name: str, items: list[dict] | None) -> str | None:
    """What a per-item judge (detection, fuzzing) answered about one excerpt, against the truth."""
    if items is None:
        return f"{name}: failed"
    said = [f"{'right' if it['answer'] == it['label'] else 'wrong'}: answered {it['answer']}"
            + ("" if it.get("p") is None else f" (P(1) {it['p']:.2f})") + f", truth {it['label']}"
            for it in items]
    return f"{name}: {'; '.join(said)}" if said else None


def neuron_view(row: dict[str, Any], simulator: str | None = None) -> dict[str, Any]:
    """What the neuron page shows, computed here so the template only lays it out."""
    excerpts = row.get("test_excerpts") or []
    scale = row.get("max_activation") or 0.0
    if scale <= 0:
        scale = max((abs(a) for ex in excerpts for a in ex["true"]), default=0.0)
    judges, answering = [], []
    for name, judge in (row.get("judges") or {}).items():
        if "test_predictions" in judge:   # detection, fuzzing: answers per excerpt, not per token
            answering.append((name, judge["test_predictions"]))
            continue
        sims = judge.get("test_simulated") or []
        finite = [abs(v) for s in sims if s for v in s if v is not None and math.isfinite(v)]
        judges.append({"name": name, "sims": sims, "scale": max(finite, default=0.0)})
    views = []
    for i, ex in enumerate(excerpts):
        per_judge = [(j["name"], j["sims"][i] if i < len(j["sims"]) else None, j["scale"])
                     for j in judges]
        views.append(_excerpt(ex, i, scale, per_judge))
        views[-1]["answers"] = [line for name, items in answering
                                if (line := answer_line(name, items[i] if i < len(items) else ()))]
    test = (row.get("scores") or {}).get("test") or {}
    score_rows = [{"name": f"test {k}", **v} for k, v in test.items() if isinstance(v, dict)]
    calibrated = (row.get("scores") or {}).get("test_calibrated")
    if calibrated:
        score_rows.append({"name": "test all, calibrated", **calibrated, "calibrated": True})
    return {"row": row, "metric": metric_of(row), "excerpts": views, "scale": scale, "score_rows": score_rows,
            "calibration": (row.get("scores") or {}).get("calibration"), "judges": judges,
            "judge_table": judge_table(row, simulator), "histogram": histogram(excerpts),
            "candidates": row.get("explanations") or []}


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["exact"] = lambda v: "–" if v is None else repr(float(v))
    env.globals["page_name"] = page_name
    env.globals["zip"] = zip
    return env


def role_name(run_dir: Path, summary: dict[str, Any], role: str) -> str | None:
    """The explainer's or simulator's model as the summary names it, or else what the run's
    settings say (``experiment.json``): e.g. the file that ``explainer=load`` read."""
    if summary.get(role):
        return str(summary[role])
    try:
        node = json.loads((run_dir / "experiment.json").read_text()).get(role) or {}
    except (OSError, ValueError):
        return None
    if not isinstance(node, dict):
        return None
    named = node.get("model") or node.get("path")
    kind = str(node.get("_target_", "")).rsplit(".", 1)[-1]
    return f"{kind} {named}".strip() if named else (kind or None)


def write_site(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write the viewer for ``run_dir`` into ``out_dir`` (default ``run_dir/viewer``); returns the
    path of its ``index.html``."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "viewer"
    rows = sorted(rows_of_run(run_dir), key=lambda r: (r["layer"], r["index"]))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    counts = summarise_rows(rows)   # from the rows, as the run's summary.json has them
    header = {"title": run_dir.resolve().name, "subject": summary.get("subject"),
              "explainer": role_name(run_dir, summary, "explainer"),
              "simulator": role_name(run_dir, summary, "simulator"),
              "n_neurons": len(rows), "n_failed": counts["n_failed"],
              "n_constant": counts["n_constant"], "metric": counts["metric"],
              "mean_score": counts["mean_score"],
              "mean_defined_score": counts["mean_defined_score"], "mass": counts["mass"]}
    judge_names = sorted(counts["judges"])
    env = environment()
    (out_dir / "neurons").mkdir(parents=True, exist_ok=True)
    page = env.get_template("viewer_neuron.html")
    for i, row in enumerate(rows):
        nav = {"prev": page_name(rows[i - 1]["layer"], rows[i - 1]["index"]) if i > 0 else None,
               "next": page_name(rows[i + 1]["layer"], rows[i + 1]["index"]) if i + 1 < len(rows) else None}
        html = page.render(header=header, nav=nav, low_mass=LOW_MASS,
                           **neuron_view(row, summary.get("choices", {}).get("simulator")))
        write_atomic(out_dir / "neurons" / page_name(row["layer"], row["index"]), html)
    index = out_dir / "index.html"
    write_atomic(index, env.get_template("viewer_index.html").render(header=header, rows=rows,
                                                                     judge_names=judge_names,
                                                                     judges=counts["judges"],
                                                                     low_mass=LOW_MASS))
    return index
