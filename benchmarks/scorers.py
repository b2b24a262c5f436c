"""Detection and fuzzing beside simulation, and revision of explanations.

1. **Scorers side by side, local backend.** The default run (the embedded SmolLM2-135M records,
   explains and simulates ``--neurons`` random neurons of the middle layer) with detection and
   fuzzing as judges on the same local model: per scorer, prompt and completion tokens per
   neuron, and its judge power on the control neurons (true minus shuffled explanations, in its
   own metric).
2. **The same through neuronlens-serve's chat endpoint**: detection and fuzzing on the OpenAI
   backend (chat only; P("1") from the output logprobs the server returns), against the embedded
   model served over HTTP, with the response cache off.
3. **Agreement.** Spearman's rho between every pair of scorers across the neurons, with its
   paired bootstrap 95% interval, on the default neurons and on the synthetic rule neurons
   (``subject=synthetic``).
4. **Revision** (``explain.revisions=1`` against 0), on the same neurons, default and synthetic:
   per judge the paired difference of test scores (revised minus not) with its interval, beside
   the judge's power, and how often a revision won on ``valid``.

Everything is the embedded model, so every number is a 135M model's; a judge without power says
nothing about explanations. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from itertools import combinations
from pathlib import Path

from common import (judge_score, machine, machine_line, paired_by_judge, power_cell,  # beside this script
                    run_pipeline, save)

JUDGES = ["+simulator@judges.detection=detection", "+simulator@judges.fuzzing=fuzzing"]
SCORERS = ["simulator", "similarity", "detection", "fuzzing"]


def tokens_per_neuron(rows: dict, judge: str) -> dict:
    """Mean prompt and completion tokens a scorer spent per neuron on its test scoring."""
    used = [(r.get("usage") or {}).get("simulator") if judge == "simulator" else
            ((r.get("judges") or {}).get(judge) or {}).get("usage") for r in rows.values()]
    used = [u for u in used if u]
    n = max(len(used), 1)
    return {"prompt": round(sum(u[0] for u in used) / n), "completion": round(sum(u[1] for u in used) / n)}


def side_by_side(summary: dict, rows: dict, judges: list[str]) -> dict:
    power = summary.get("judge_power") or {}
    return {j: {"metric": (power.get(j) or {}).get("metric"), "mean": judge_mean(rows, j),
                "tokens_per_neuron": tokens_per_neuron(rows, j),
                "power_difference": (power.get(j) or {}).get("difference"),
                "power_ci": (power.get(j) or {}).get("difference_ci"),
                "has_power": (power.get(j) or {}).get("tells_apart")} for j in judges}


def judge_mean(rows: dict, judge: str) -> float | None:
    scores = [s for r in rows.values() if (s := judge_score(r, judge)) is not None]
    return sum(scores) / len(scores) if scores else None


def agreement(rows: dict) -> list[dict]:
    """Spearman's rho of every pair of scorers over the neurons both scored."""
    from neuronlens.stats import agreement as rho

    out = []
    for a, b in combinations(SCORERS, 2):
        pairs = [(x, y) for r in rows.values()
                 if (x := judge_score(r, a)) is not None and (y := judge_score(r, b)) is not None]
        ag = rho([x for x, _ in pairs], [y for _, y in pairs])
        out.append({"a": a, "b": b, "n": ag.n, "spearman": ag.spearman, "p": ag.p,
                    "ci": None if ag.ci is None else [ag.ci.low, ag.ci.high]})
    return out


def revised(rows: dict) -> dict:
    entries = [v for r in rows.values() for v in r.get("revisions") or ()]
    return {"revisions": len(entries), "won": sum(bool(v.get("won")) for v in entries),
            "unchanged": sum(bool(v.get("unchanged")) for v in entries)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--neurons", type=int, default=8, help="random neurons of the middle layer")
    p.add_argument("--synthetic", default="[0,1,2,3,4,5,6,7]", help="synthetic rule neurons (indices)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="scorers")
    args = p.parse_args()

    from neuronlens.serve import start_server

    os.environ.setdefault("OPENAI_API_KEY", "unused")   # the OpenAI client wants one; the local server none
    wall = time.perf_counter()
    base = [f"neurons.per_layer={args.neurons}", f"seed={args.seed}", "progress=false", *JUDGES]
    synthetic = [f"seed={args.seed}", "progress=false", *JUDGES, "subject=synthetic", "neurons.which=list",
                 f"neurons.indices={args.synthetic}", "judge_power.enabled=false"]
    res: dict = {"machine": machine("cpu"), "neurons": args.neurons, "seed": args.seed, "phases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        clock = time.perf_counter()
        local, rows = run_pipeline(base, Path(tmp) / "local")
        res["phases"]["local"] = time.perf_counter() - clock
        res["local"] = side_by_side(local, rows, SCORERS)
        clock = time.perf_counter()
        with start_server("embedded", device="cpu") as server:
            chat = [f"simulator@judges.{j}.backend=openai" for j in ("detection", "fuzzing")]
            chat += [f"judges.{j}.backend.{k}={v}" for j in ("detection", "fuzzing")
                     for k, v in (("model", server.model), ("base_url", server.base_url))]
            served, served_rows = run_pipeline(base + chat + ["~simulator@judges.similarity", "remote.cache=false"],
                                               Path(tmp) / "served")
        res["phases"]["served"] = time.perf_counter() - clock
        res["served"] = side_by_side(served, served_rows, ["detection", "fuzzing"])
        clock = time.perf_counter()
        _, synthetic_rows = run_pipeline(synthetic, Path(tmp) / "synthetic")
        res["phases"]["synthetic"] = time.perf_counter() - clock
        res["agreement"] = {"default": agreement(rows), "synthetic": agreement(synthetic_rows)}
        clock = time.perf_counter()
        _, revised_rows = run_pipeline(base + ["explain.revisions=1", "judge_power.enabled=false"],
                                       Path(tmp) / "revised")
        _, revised_synthetic = run_pipeline(synthetic + ["explain.revisions=1"], Path(tmp) / "revised_synthetic")
        res["phases"]["revision"] = time.perf_counter() - clock
    power = local.get("judge_power")
    res["revision"] = {"default": {"judges": paired_by_judge(revised_rows, rows, SCORERS, power),
                                   **revised(revised_rows)},
                       "synthetic": {"judges": paired_by_judge(revised_synthetic, synthetic_rows, SCORERS, power),
                                     **revised(revised_synthetic)}}
    res["wall_seconds"] = time.perf_counter() - wall
    r3 = lambda x: None if x is None else round(x, 4)   # noqa: E731
    res["summary"] = {
        "benchmark": args.name, "neurons": args.neurons,
        **{f"{j}_tokens_per_neuron": sum(v["tokens_per_neuron"].values()) for j, v in res["local"].items()},
        **{f"{j}_power": r3(v["power_difference"]) for j, v in res["local"].items()},
        **{f"{j}_has_power": v["has_power"] for j, v in res["local"].items()},
        **{f"served_{j}_has_power": v["has_power"] for j, v in res["served"].items()},
        **{f"revised_{j}_difference": r3(v["difference"]) for j, v in res["revision"]["default"]["judges"].items()},
        "revisions_won": res["revision"]["default"]["won"] + res["revision"]["synthetic"]["won"],
        "wall_seconds": round(res["wall_seconds"], 1)}
    save(args.name, res, markdown)


def markdown(res: dict) -> str:
    num = lambda x, f="+.3f": "–" if x is None else format(x, f)   # noqa: E731
    ci = lambda c: "" if c is None else f" [{c[0]:+.3f}, {c[1]:+.3f}]"   # noqa: E731
    lines = ["# Detection and fuzzing beside simulation, and revision (`python benchmarks/scorers.py`)", "",
             machine_line(res["machine"]), "",
             f"{res['neurons']} random neurons of the embedded SmolLM2-135M's middle layer (seed {res['seed']}); "
             "every explainer, simulator and judge is that same model (the similarity judge: MiniLM).", "",
             "## Scorers side by side", "",
             "| scorer | backend | metric | mean test score | tokens per neuron (prompt + completion) "
             "| judge power (true - shuffled) |", "|---|---|---|---:|---:|---|"]
    for where, label in (("local", "local"), ("served", "neuronlens-serve chat (openai)")):
        for j, v in res[where].items():
            t = v["tokens_per_neuron"]
            lines.append(f"| {j} | {label} | {v['metric'] or '–'} | {num(v['mean'], '.3f')} "
                         f"| {t['prompt']} + {t['completion']} | {power_cell(v)} |")
    for name, pairs in res["agreement"].items():
        lines += ["", f"## Agreement across neurons ({name})", "",
                  "| scorer A | scorer B | n | Spearman rho [95% CI] | p |", "|---|---|---:|---|---:|"]
        for a in pairs:
            lines.append(f"| {a['a']} | {a['b']} | {a['n']} | {num(a['spearman'])}{ci(a['ci'])} "
                         f"| {num(a['p'], '.3f')} |")
    for name, rev in res["revision"].items():
        lines += ["", f"## Revision, `explain.revisions=1` against 0 ({name} neurons)", "",
                  f"{rev['revisions']} revisions, {rev['won']} won on valid, {rev['unchanged']} gave the same words.", "",
                  "| judge | revised - not [95% CI] | Wilcoxon p | judge power |", "|---|---|---:|---|"]
        for j, v in rev["judges"].items():
            lines.append(f"| {j} | {num(v['difference'])}{ci(v['ci'])} | {num(v['wilcoxon_p'], '.3f')} "
                         f"| {power_cell(v)} |")
    lines += ["", "A difference or correlation whose interval holds 0 is no evidence either way, and a judge "
              "without power cannot rank explanations at all."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
