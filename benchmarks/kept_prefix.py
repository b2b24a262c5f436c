"""The local backend's kept prefix: simulating many explanations in a row, with the KV cache of
the previous call's prompt prefix reused (the instructions and few-shot examples every
explanation shares) against the same backend that forgets it before every call.

This is the pattern of a run's judge-power check and of every neuron's valid/test simulations:
one ``Simulator.simulate(explanation, excerpts)`` per explanation, each prompt the same up to the
explanation. Both variants are ``Simulator(LocalBackend(model, prefix_reuse=True))`` on the same
model, explanations and excerpts (16-token windows of the built-in corpus, three per call, as the
judge-power controls use); the baseline sets ``backend._kept = None`` before each call. They
alternate (A B, B A, ...) after a warm-up; the headline ``ratio`` is the median of the per-round
paired ratios (forget / keep). The max |difference| of expected values between them is reported.

Run with no arguments (about 2 minutes on 2 CPU cores). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
from itertools import islice

from common import alternate, machine, machine_line, paired_ratio, save

EXPLANATIONS = ("digits and numbers", "names of animals", "words about the weather",
                "days of the week and names of months", "negation words such as not, no and never",
                "words that start with a capital letter", "the word right after \"the\"",
                "the first few tokens of the text")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--excerpts", type=int, default=3)
    ap.add_argument("--name", default="kept_prefix")
    args = ap.parse_args()

    from neuronlens.backends.local import LocalBackend
    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.records import ActivationRecord
    from neuronlens.scorers.simulation import Simulator
    from neuronlens.models import load_tokenizer

    info = machine("cpu")
    tokenizer = load_tokenizer(args.model)
    windows = list(islice(token_windows(BuiltinCorpus(), tokenizer, 16, None), args.excerpts))
    records = [ActivationRecord([tokenizer.decode([i]) for i in w], [0.0] * len(w)) for w in windows]
    backend = LocalBackend(model=args.model, device="cpu")
    backend.load()
    simulator = Simulator(backend)

    def sweep(forget: bool):
        out = []
        for explanation in EXPLANATIONS:
            if forget:
                backend._kept = None
            out.append(simulator.simulate(explanation, records).expected)
        return out

    def cold_sweep(forget: bool):
        backend._kept = None   # each sweep starts cold
        return sweep(forget)

    sweep(False)   # warm-up
    times, results = alternate({"keep": False, "forget": True}, cold_sweep, args.rounds)
    ratio = paired_ratio(times, "forget", "keep")
    diff = max(abs(a - b) for ek, ef in zip(results["keep"], results["forget"])
               for xs, ys in zip(ek, ef) for a, b in zip(xs, ys))
    summary = {"benchmark": args.name, "ratio": round(ratio, 3),
               "seconds_keep": round(statistics.median(times["keep"]), 2),
               "seconds_forget": round(statistics.median(times["forget"]), 2),
               "explanations": len(EXPLANATIONS), "excerpts_per_call": len(records),
               "max_abs_diff_expected": float(f"{diff:.3g}"), "model": args.model}
    res = {"summary": summary, "seconds": times, "machine": info}
    save(args.name, res, "\n".join([
        "# Kept prompt prefix (local backend)", "", machine_line(info), "",
        f"{len(EXPLANATIONS)} explanations simulated in a row on {len(records)} excerpts of 16 "
        f"tokens each (`{args.model}`), {args.rounds} alternated rounds, medians:", "",
        "| variant | seconds per sweep |", "|---|---:|",
        f"| prefix kept from the previous call | {summary['seconds_keep']} |",
        f"| prefix computed again every call (before) | {summary['seconds_forget']} |", "",
        f"Speedup (median of paired rounds): **{ratio:.2f}x**. Max |expected value difference|: "
        f"{diff:.2e}.", ""]))


if __name__ == "__main__":
    main()
