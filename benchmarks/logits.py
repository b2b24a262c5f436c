"""Does showing the explainer a neuron's output side help? ``explain.show_logits`` on vs off.

Two runs of the default pipeline (the embedded SmolLM2-135M as subject, explainer and simulator,
the similarity judge beside it) on the same ``--neurons`` random neurons of the middle layer and
the same recording: one shows the explainer only the neuron's top excerpts, the other also the
10 tokens its output promotes and the 10 it suppresses (``subject/logits.py``). Reported per
judge: the paired difference of test scores (on minus off) with its bootstrap 95% interval and
p-values, beside that judge's power on the control neurons (measured in the first run), and how
many explanations changed. A difference whose interval holds 0, or from a judge without power,
says nothing.

Run with no arguments: 16 neurons, about 12 minutes on a 2-core CPU (the first run also records
the layer once, if it is not cached). ``--sae DIR --name logits_sae``: the same on random latents
of an SAE (their output side is their decoder row). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import machine, machine_line, paired_by_judge, power_cell, run_pipeline, save  # beside this script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--neurons", type=int, default=16, help="random neurons of the middle layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sae", type=Path, default=None,
                   help="random latents of this SAE (e.g. <neuronlens-sae run>/sae) instead of neurons")
    p.add_argument("--name", default="logits")
    args = p.parse_args()

    wall = time.perf_counter()
    base = [f"neurons.per_layer={args.neurons}", f"seed={args.seed}", "progress=false",
            *(["subject=sae", f"subject.path={args.sae}"] if args.sae else [])]
    with tempfile.TemporaryDirectory() as tmp:
        off, rows_off = run_pipeline(base, Path(tmp) / "off")
        on, rows_on = run_pipeline(base + ["explain.show_logits=true", "judge_power.enabled=false"], Path(tmp) / "on")
    keys = sorted(rows_off.keys() & rows_on.keys())
    judges = ["simulator", *sorted(off.get("judges") or {})]
    per_judge = {j: {k.replace("_after", "_on").replace("_before", "_off"): v for k, v in d.items()}
                 for j, d in paired_by_judge(rows_on, rows_off, judges, off.get("judge_power")).items()}
    changed = sum(rows_on[k].get("explanation") != rows_off[k].get("explanation") for k in keys)
    res = {"machine": machine("cpu"), "neurons": args.neurons, "seed": args.seed, "n_paired": len(keys),
           "units": f"latents of the SAE {args.sae}" if args.sae else "neurons",
           "explanations_changed": changed, "judges": per_judge,
           "explanations": {f"{l}/{i}": {"off": rows_off[(l, i)].get("explanation"),
                                         "on": rows_on[(l, i)].get("explanation")} for l, i in keys},
           "wall_seconds": time.perf_counter() - wall}
    res["summary"] = {"benchmark": args.name, "neurons": len(keys), "explanations_changed": changed,
                      **{f"{j}_difference": None if v["difference"] is None else round(v["difference"], 4)
                         for j, v in per_judge.items()},
                      **{f"{j}_ci": None if v["ci"] is None else [round(x, 4) for x in v["ci"]]
                         for j, v in per_judge.items()},
                      **{f"{j}_has_power": v["has_power"] for j, v in per_judge.items()},
                      "wall_seconds": round(res["wall_seconds"], 1)}
    save(args.name, res, markdown(res))


def markdown(res: dict) -> str:
    fmt = lambda x: "–" if x is None else f"{x:+.3f}"  # noqa: E731
    lines = ["# Showing the explainer the output side (`python benchmarks/logits.py`)", "",
             machine_line(res["machine"]), "",
             f"{res['n_paired']} random {res.get('units', 'neurons')} of the embedded SmolLM2-135M's middle layer (seed "
             f"{res['seed']}), explained by the same model with and without `explain.show_logits`; "
             f"{res['explanations_changed']} explanations changed.", "",
             "| judge | mean on | mean off | on - off [95% CI] | Wilcoxon p | judge power (true - shuffled) |",
             "|---|---:|---:|---|---:|---|"]
    for judge, v in res["judges"].items():
        ci = "" if v["ci"] is None else f" [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"
        power = power_cell(v)
        p = "–" if v["wilcoxon_p"] is None else f"{v['wilcoxon_p']:.3f}"
        lines.append(f"| {judge} | {v['mean_on']:.3f} | {v['mean_off']:.3f} | {fmt(v['difference'])}{ci} "
                     f"| {p} | {power} |")
    lines += ["", "A difference whose interval holds 0 is no evidence either way."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
