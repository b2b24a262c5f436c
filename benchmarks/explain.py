"""Explanations of neurons in flight on the local backend: K neurons explained one at a time
against the same K from K threads at once (as ``concurrency=K`` runs them), where the backend
decodes their greedy answers together (``LocalBackend._greedy_batch``: one padded pass over the
prompts after their shared prefix, then one pass per token for all of them). The backend does
that by default only on an accelerator; here ``batch_generations`` is set, to measure it on any.

Both variants are ``LLMExplainer(LocalBackend(model))``, greedy (n=1, as a run's default), on the
same neurons: each is ``--records`` 64-token windows of the built-in corpus with made-up
activations (a few tokens of each window lit; the prompt's length and format are what matter
for speed). Each variant starts from a cold prefix cache; they alternate (A B, B A, ...). The
headline ``ratio`` is the median of the per-round paired ratios (one at a time / in flight).
Reported too: the prompt and answer tokens, and how many explanations differ between the two
(float noise can flip a near-tie of a greedy choice; 0 expected).

Run with no arguments (about 13 minutes on 2 CPU cores: each explanation prefills ~3,000
prompt tokens, and an answer copying a few-shot example is asked again). The last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

from common import alternate, machine, machine_line, paired_ratio, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--neurons", type=int, default=4, help="neurons, and threads in flight")
    ap.add_argument("--records", type=int, default=10, help="top excerpts shown per neuron")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default="explain_in_flight")
    args = ap.parse_args()
    wall = time.perf_counter()

    from neuronlens.backends.local import LocalBackend
    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.explainers.llm import LLMExplainer
    from neuronlens.records import ActivationRecord, NeuronId

    info = machine("cpu")
    backend = LocalBackend(model=args.model, device="cpu")
    backend.load()
    backend.batch_generations = True
    tok = backend.tokenizer
    windows = list(islice(token_windows(BuiltinCorpus(), tok, 64, None), args.neurons * args.records))
    neurons = []
    for k in range(args.neurons):   # neuron k lights every (k + 5)th token, more at the start
        recs = [ActivationRecord([tok.decode([i]) for i in w],
                                 [float(10 - t % 7) if t % (k + 5) == 2 else 0.0 for t in range(len(w))])
                for w in windows[k * args.records:(k + 1) * args.records]]
        neurons.append((NeuronId(0, k), recs))
    explainer = LLMExplainer(backend)

    def explain(in_flight: int) -> dict:
        backend.reset_prefix_cache()
        with ThreadPoolExecutor(in_flight) as pool:
            results = list(pool.map(lambda job: explainer.explain(*job), neurons))
        return {"explanations": [r.explanations for r in results],
                "prompt_tokens": sum(r.prompt_tokens for r in results),
                "completion_tokens": sum(r.completion_tokens for r in results)}

    explain(1)   # warm-up
    times, results = alternate({"one_at_a_time": 1, "in_flight": args.neurons}, explain, args.rounds)
    ratio = paired_ratio(times, "one_at_a_time", "in_flight")
    differ = sum(a != b for a, b in zip(results["one_at_a_time"]["explanations"],
                                        results["in_flight"]["explanations"]))
    summary = {"benchmark": args.name, "ratio": round(ratio, 3), "neurons": args.neurons,
               "records_per_neuron": args.records,
               "seconds_one_at_a_time": round(statistics.median(times["one_at_a_time"]), 2),
               "seconds_in_flight": round(statistics.median(times["in_flight"]), 2),
               "prompt_tokens_one_at_a_time": results["one_at_a_time"]["prompt_tokens"],
               "prompt_tokens_in_flight": results["in_flight"]["prompt_tokens"],
               "completion_tokens": results["in_flight"]["completion_tokens"],
               "explanations_that_differ": differ, "model": args.model,
               "wall_seconds": round(time.perf_counter() - wall, 1)}
    res = {"summary": summary, "seconds": times, "machine": info,
           "explanations": results["in_flight"]["explanations"]}
    save(args.name, res, "\n".join([
        "# Explanations of neurons in flight (local backend)", "", machine_line(info), "",
        f"{args.neurons} neurons (each {args.records} excerpts of 64 tokens), greedy, explained by "
        f"`{args.model}`, {len(times['in_flight'])} alternated rounds, medians:", "",
        "| variant | seconds | prompt tokens run |", "|---|---:|---:|",
        f"| one neuron at a time | {summary['seconds_one_at_a_time']} | "
        f"{summary['prompt_tokens_one_at_a_time']} |",
        f"| all {args.neurons} in flight, decoded together | {summary['seconds_in_flight']} | "
        f"{summary['prompt_tokens_in_flight']} |", "",
        f"Speedup (median of paired rounds): **{ratio:.3f}x**; {summary['completion_tokens']} answer "
        f"tokens; {differ} of {args.neurons} explanations differ between the two.", ""]))


if __name__ == "__main__":
    main()
