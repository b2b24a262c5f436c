"""Simulation prompts compared by judge power: can a simulator, with each prompt, tell the true
explanation of a rule neuron from a shuffled one?

The controls are the rule neurons of ``conf/subject/synthetic.yaml`` recorded on the built-in
corpus (as a run's judge-power check, with more and longer excerpts). Each prompt scores every
control with its true explanation and with the next control's (``neuronlens.scorers.judge_power.power``):
the paired difference of correlations (true minus shuffled) with its bootstrap 95% interval, the
AUC, and the digit mass (the probability the simulator put on "0".."10" at a placeholder before
renormalising). The prompts, on the same simulator model:

- ``neuronlens``: the default (``simulation.prompt=neuronlens``);
- ``no_fewshot``: the same without its few-shot examples (``simulation.fewshot=false``), a floor;
- ``openai``: OpenAI's prompt and few-shot examples (``simulation.prompt=openai``), loaded from the
  installed ``automated-interpretability``; left out (and said so) when it is not installed.

Headline ``ratio``: the default prompt's difference over the reference's (over ``no_fewshot``
without the reference); null, and said so, unless both intervals lie above 0. Run with no
arguments (about 3 minutes on 2 CPU cores with the embedded SmolLM2-135M-Instruct). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import machine, machine_line, save

PROMPTS = {"neuronlens": {"prompt": "neuronlens"}, "no_fewshot": {"fewshot": False},
           "openai": {"prompt": "openai"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--prompts", default=",".join(PROMPTS))
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--n-random", type=int, default=4)
    ap.add_argument("--max-windows", type=int, default=1000)
    ap.add_argument("--name", default="prompts")
    args = ap.parse_args()

    from omegaconf import OmegaConf

    from neuronlens.backends.local import LocalBackend
    from neuronlens.scorers.judge_power import power
    from neuronlens.subject.synthetic import control_neurons
    from neuronlens.errors import UserError
    from neuronlens.scorers.simulation import Simulator

    info = machine("cpu")
    settings = OmegaConf.create({"window": args.window, "top_k": args.top_k,
                                 "n_random": args.n_random, "max_windows": args.max_windows})
    with tempfile.TemporaryDirectory() as tmp:
        controls = control_neurons(settings, Path(tmp))
    backend = LocalBackend(model=args.model, device="cpu")
    backend.load()
    results, skipped = {}, {}
    for name in args.prompts.split(","):
        try:
            simulator = Simulator(backend, "all_at_once", **PROMPTS[name])
            simulator.check()
        except UserError as e:   # the reference prompt without its package
            skipped[name] = str(e)
            print(f"{name}: skipped: {e}", file=sys.stderr)
            continue
        start = time.perf_counter()
        results[name] = power(simulator, controls) | {"seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
    base = "openai" if "openai" in results else "no_fewshot"
    ours, theirs = results.get("neuronlens", {}), results.get(base, {})
    # a ratio of two differences means something only when both are told apart from 0
    ratio = (round(ours["difference"] / theirs["difference"], 3)
             if ours.get("tells_apart") and theirs.get("tells_apart") else None)
    summary = {"benchmark": args.name, "baseline": base, "ratio": ratio,
               "ratio_note": None if ratio is not None else
               "null: the default prompt or the baseline cannot tell true from shuffled here",
               "model": args.model, "controls": len(controls),
               "excerpts_per_control": args.top_k + args.n_random, "window": args.window}
    for name, r in results.items():
        summary[name] = {k: r[k] for k in ("auc", "difference", "difference_ci", "tells_apart")} | {
            "mass_mean": (r["mass"] or {}).get("mean")}
    res = {"summary": summary, "results": results, "skipped": skipped, "machine": info}
    rows = "\n".join(
        f"| `{n}` | {r['mean_true']} | {r['mean_shuffled']} | {r['difference']} "
        f"[{', '.join(map(str, r['difference_ci'] or ['—']))}] | {r['auc']} | "
        f"{(r['mass'] or {}).get('mean')} | {r['seconds']} |" for n, r in results.items())
    save(args.name, res,
        f"# Simulation prompts by judge power\n\n{machine_line(info)}\n\n"
        f"Simulator `{args.model}`, all at once; {len(controls)} rule neurons, {args.top_k} top + "
        f"{args.n_random} random excerpts of {args.window} tokens each.\n\n"
        "| prompt | mean r, true | mean r, shuffled | difference [95% CI] | AUC | digit mass | s |\n"
        f"|---|---|---|---|---|---|---|\n{rows}\n"
        + "".join(f"\nSkipped `{n}`: {why}\n" for n, why in skipped.items())
        + f"\nCommand: `python benchmarks/prompts.py {' '.join(sys.argv[1:])}`\n")


if __name__ == "__main__":
    main()
