"""Simulation throughput: the prefix-reuse engine vs a naive full prompt per excerpt.

Both engines are ``Simulator(LocalBackend(batch_size=8, prefix_reuse=...))`` on the same model
(the embedded SmolLM2-135M-Instruct by default) scoring the same excerpts (64-token windows of the
built-in corpus, tokens as strings via ``tokenizer.decode`` per id) for one explanation. The
engines alternate (A B, B A, ...) after a warm-up; the figures are medians over the rounds.

- ``prefix_reuse=True``: the prompt prefix every excerpt shares (instructions, the few-shot
  examples, the explanation) is run once into a KV cache, then the excerpts are batched after it.
- ``prefix_reuse=False``: every excerpt's full prompt is run on its own (still batched by 8).

Reported: excerpts/s of both, the speedup (headline ``ratio``, median of the per-round paired
ratios), the forward tokens each processes (sum of ``usage.prompt_tokens``), the prefix and
per-excerpt suffix lengths, and the max |difference| between the two engines' expected values.

``--neurons N`` (N > 1) measures something else, saved as ``results/simulation_neurons.*``: N
neurons in a row, as a run simulates them, each with its own explanation and ``--excerpts``
windows, on one prefix-reusing backend. Its headline ``ratio`` is the forward tokens run (sum
of ``usage.prompt_tokens``) over the floor: the distinct token prefixes of all N x excerpts
prompts (what any prefix-caching engine must compute at least once: the instructions and
examples once per run, each explanation once per neuron, each excerpt once) plus the
candidate-trie tokens for a two-token "10". Target: <= 1.1.

``--long-prefix`` adds a separate, clearly labelled figure with a longer prefix: the same engine
and format with three more few-shot example neurons, each a full 64-token corpus excerpt (the
built-in examples are shorter hand-written ones). It is never the headline.

Run with no arguments (<= 3 min on 2 CPU cores); bigger sizes by flags. The last line printed is
one JSON object with the headline ``ratio``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

from common import (  # benchmarks/common.py, beside this script
    alternate,
    machine,
    machine_line,
    paired_ratio,
    save,
)

EXPLANATION = "words about food, cooking and recipes"
# Extra few-shot explanations for --long-prefix (activations are put on a few tokens of a corpus
# window: the prompt's length and format are what matter for speed).
EXTRA_FEWSHOT = ("punctuation at the end of a sentence", "the word 'the' and other articles",
                 "numbers and dates")


def long_prefix_requests(explanation: str, records, example_windows, tokenizer):
    """The engine's own prompts (``build_request``) with more few-shot example neurons: the
    built-in ones plus one per ``EXTRA_FEWSHOT``, each a 64-token corpus window (activations put
    on every ninth token; the prompt's length and format are what matter for speed)."""
    import neuronlens.scorers.simulation as sim

    extra = tuple((expl, [(tokenizer.decode([i]), 10 if n % 9 == 4 else 0)
                          for n, i in enumerate(window)])
                  for expl, window in zip(EXTRA_FEWSHOT, example_windows))
    saved = sim.FEWSHOT
    sim.FEWSHOT = tuple(saved) + extra  # only while these prompt strings are built
    try:
        requests = [sim.build_request(explanation, r.tokens) for r in records]
        prefix = sim.prompt_prefix(explanation)
    finally:
        sim.FEWSHOT = saved
    return requests, prefix, len(saved) + len(extra)


NEURON_EXPLANATIONS = (
    "words about food, cooking and recipes", "numbers and dates", "the end of a sentence",
    "names of people", "words about the weather", "verbs in the past tense", "opening quotation marks",
    "place names and countries", "words about money and prices", "the word 'the' and other articles",
    "plural nouns", "words about sport and games", "question words", "colours", "units of measure",
    "words about health and medicine")


def distinct_prefixes(prompts: list[list[int]]) -> int:
    """How many distinct token prefixes the prompts have (the nodes of their token trie)."""
    ordered = sorted(prompts)
    shared = 0
    for a, b in zip(ordered, ordered[1:]):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        shared += n
    return sum(map(len, prompts)) - shared


def many_neurons(args, backend, tokenizer, windows, device: str, info: dict, wall: float) -> None:
    """``--neurons N``: N neurons in a row on one backend, forward tokens against the floor."""
    from neuronlens.records import ActivationRecord
    from neuronlens.scorers.simulation import Simulator, build_request

    names = [NEURON_EXPLANATIONS[i % len(NEURON_EXPLANATIONS)] + ("" if i < len(NEURON_EXPLANATIONS)
             else f" (variant {i // len(NEURON_EXPLANATIONS)})") for i in range(args.neurons)]
    records = [ActivationRecord([tokenizer.decode([i]) for i in w], [0.0] * len(w)) for w in windows]
    per_neuron = [records[k * args.excerpts:(k + 1) * args.excerpts] for k in range(args.neurons)]
    sim = Simulator(backend)

    def simulate(in_flight: int) -> dict:   # every neuron, from a cold prefix cache
        from concurrent.futures import ThreadPoolExecutor

        backend.reset_prefix_cache()
        with ThreadPoolExecutor(in_flight) as pool:
            results = list(pool.map(sim.simulate, names, per_neuron))
        return {"tokens": sum(r.usage.prompt_tokens for r in results),
                "failed": sum(r.n_failed for r in results), "expected": [r.expected for r in results]}

    engines = {"in_a_row": 1} | ({"in_flight": args.in_flight} if args.in_flight > 1 else {})
    times, results = alternate(engines, simulate, args.rounds if args.in_flight > 1 else 1,
                               deadline=wall + args.budget_s, device=device, verbose=args.verbose)
    seconds = statistics.median(times["in_a_row"])
    run, failed = results["in_a_row"]["tokens"], results["in_a_row"]["failed"]
    prompts, extras = [], 0
    for explanation, recs in zip(names, per_neuron):
        for r in recs:
            request = build_request(explanation, r.tokens)
            enc = tokenizer(request.prompt, return_offsets_mapping=True)
            prompts.append(list(enc["input_ids"]))
            extras += sum(len(q.paths) for q in backend._queries(request, enc["input_ids"],
                                                                   enc["offset_mapping"]))
    floor = distinct_prefixes(prompts) + extras
    naive = sum(map(len, prompts)) + extras
    res = {"benchmark": args.name, "model": args.model, "machine": info,
           "neurons": args.neurons, "excerpts_per_neuron": args.excerpts, "window": args.window,
           "batch_size": args.batch_size, "forward_tokens": run, "floor_tokens": floor,
           "trie_tokens": extras, "full_prompt_tokens": naive, "seconds": seconds,
           "forward_tokens_per_s": run / seconds, "failed_excerpts": failed,
           "wall_seconds": time.perf_counter() - wall}
    res["machine"]["load_average_at_end"] = list(os.getloadavg())
    res["summary"] = {"benchmark": args.name, "ratio": round(run / floor, 4),
                      "forward_tokens": run, "floor_tokens": floor, "full_prompt_tokens": naive,
                      "seconds_per_neuron": round(seconds / args.neurons, 2),
                      "forward_tokens_per_s": round(run / seconds, 1), "failed_excerpts": failed,
                      "device": device, "model": args.model, "wall_seconds": round(res["wall_seconds"], 1)}
    if args.in_flight > 1:   # the neurons from --in-flight threads, as concurrency runs them
        flight = results["in_flight"]
        diff = max(abs(a - b) for x, y in zip(flight["expected"], results["in_a_row"]["expected"])
                   for u, v in zip(x, y) for a, b in zip(u, v))
        res["in_flight"] = {"threads": args.in_flight, "seconds": times["in_flight"],
                            "forward_tokens": flight["tokens"], "failed_excerpts": flight["failed"],
                            "largest_difference": diff}
        res["summary"] |= {"in_flight": args.in_flight, "in_flight_forward_tokens": flight["tokens"],
                           "in_flight_tokens_ratio": round(flight["tokens"] / floor, 4),
                           "in_flight_failed_excerpts": flight["failed"],
                           "in_flight_largest_difference": diff,
                           "in_flight_vs_in_a_row": round(paired_ratio(times, "in_a_row", "in_flight"), 3)}
    m = res["machine"]
    flight_lines = [] if args.in_flight <= 1 else [
        f"With {args.in_flight} neurons in flight (threads, as `concurrency={args.in_flight}` runs them; "
        "their calls go to the backend together: the instructions once, each explanation once, the "
        f"excerpts batched across neurons): {res['in_flight']['forward_tokens']} forward tokens "
        f"({res['summary']['in_flight_tokens_ratio']:.3f}x the floor), "
        f"**{res['summary']['in_flight_vs_in_a_row']:.3f}x** the speed of one neuron at a time "
        f"(median of paired rounds), expected values within {res['in_flight']['largest_difference']:.1e} "
        "of one at a time.", ""]
    save(args.name, res, "\n".join([
        f"# Simulation of {args.neurons} neurons in a row (`python benchmarks/simulation.py "
        f"--neurons {args.neurons}`)", "", machine_line(m),
        f"Simulator model: `{args.model}`, local backend (batch {args.batch_size}, prefix reuse), "
        f"{args.excerpts} excerpts of {args.window} tokens per neuron, each neuron its own "
        "explanation and excerpts.", "",
        "| | tokens |", "|---|---:|",
        f"| forward tokens run (sum of usage.prompt_tokens) | {run} |",
        f"| floor: distinct prompt-token prefixes + candidate-trie tokens | {floor} |",
        f"| every prompt whole (no reuse) | {naive} |", "",
        f"Forward tokens / floor: **{run / floor:.3f}** (target <= 1.1); "
        f"{seconds / args.neurons:.1f} s per neuron, {run / seconds:.0f} forward tokens/s; "
        f"{failed} failed excerpts. The shared instructions and examples are computed once for "
        "the run (the backend keeps the previous call's prefix), each explanation once per neuron.", "",
        *flight_lines]))


def usage_tokens(result) -> int:
    return sum(d.usage.prompt_tokens for d in result) if isinstance(result, list) \
        else result.usage.prompt_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="HF name, local path, .gguf, or 'embedded'")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    p.add_argument("--excerpts", type=int, default=8,
                   help="excerpts per simulate() call (one neuron's test excerpts)")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="at most this many alternated rounds")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="no new round (after 2) once it would pass this many seconds of the run "
                        "(for --long-prefix: of its own section)")
    p.add_argument("--long-prefix", action="store_true",
                   help="also measure a longer, more realistic prefix (3 extra few-shot neurons)")
    p.add_argument("--neurons", type=int, default=1,
                   help="N > 1: simulate N neurons in a row and compare forward tokens with the floor")
    p.add_argument("--in-flight", type=int, default=1,
                   help="with --neurons: also simulate them from this many threads at once (as "
                        "concurrency does), alternated with one at a time over --rounds")
    p.add_argument("--name", default=None, help="results file stem under results/ (default: "
                   "simulation, or simulation_neurons with --neurons)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default, one per core)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    args.name = args.name or ("simulation_neurons" if args.neurons > 1 else "simulation")

    wall = time.perf_counter()
    import torch

    from neuronlens.backends.local import LocalBackend
    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.records import ActivationRecord
    from neuronlens.scorers.simulation import Simulator, build_request, prompt_prefix
    from neuronlens.models import pick_device

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine(device)
    if args.neurons > 1:
        backend = LocalBackend(args.model, device, batch_size=args.batch_size, prefix_reuse=True)
        backend.load()
        windows = list(token_windows(BuiltinCorpus(), backend.tokenizer, window=args.window,
                                     max_windows=args.neurons * args.excerpts))
        return many_neurons(args, backend, backend.tokenizer, windows, device, info, wall)
    backends = {"prefix_reuse": LocalBackend(args.model, device, batch_size=args.batch_size,
                                             prefix_reuse=True),
                "naive": LocalBackend(args.model, device, batch_size=args.batch_size,
                                      prefix_reuse=False)}
    sims = {n: Simulator(b) for n, b in backends.items()}
    for backend in backends.values():
        backend.load()
    if backends["prefix_reuse"].model is not backends["naive"].model:
        raise RuntimeError("the two backends should share one cached model (load_model)")
    tokenizer = backends["naive"].tokenizer
    windows = list(token_windows(BuiltinCorpus(), tokenizer, window=args.window,
                                 max_windows=args.excerpts + len(EXTRA_FEWSHOT)))
    excerpt_windows, example_windows = windows[:args.excerpts], windows[args.excerpts:]
    records = [ActivationRecord([tokenizer.decode([i]) for i in w], [0.0] * len(w))
               for w in excerpt_windows]
    warm = [ActivationRecord(r.tokens[:8], r.activations[:8]) for r in records[:2]]
    for sim in sims.values():  # warm-up: one small call each (the prefix path needs 2 excerpts)
        sim.simulate(EXPLANATION, warm)
    times, results = alternate(sims, lambda s: s.simulate(EXPLANATION, records), args.rounds,
                               wall + args.budget_s, device, args.verbose, "default")
    reuse, naive = results["prefix_reuse"], results["naive"]
    diff = max(abs(a - b) for ea, eb in zip(reuse.expected, naive.expected)
               if ea is not None and eb is not None for a, b in zip(ea, eb))
    prefix_len = backends["naive"].count_tokens(prompt_prefix(EXPLANATION))
    full_len = len(tokenizer(build_request(EXPLANATION, records[0].tokens).prompt)["input_ids"])
    n = len(records)
    default = {
        "excerpts": n, "window": args.window, "batch_size": args.batch_size,
        "rounds": len(times["naive"]), "seconds": times,
        "excerpts_per_s": {k: n / statistics.median(v) for k, v in times.items()},
        "ratio": paired_ratio(times, "naive", "prefix_reuse"),
        "forward_tokens": {"prefix_reuse": usage_tokens(reuse), "naive": usage_tokens(naive)},
        "prompt_tokens_prefix": prefix_len,
        "prompt_tokens_full_first_excerpt": full_len,
        "prompt_tokens_suffix_first_excerpt": full_len - prefix_len,
        "max_abs_diff_expected": diff,
        "n_failed": {"prefix_reuse": reuse.n_failed, "naive": naive.n_failed},
    }
    default["forward_token_ratio"] = (default["forward_tokens"]["naive"]
                                      / default["forward_tokens"]["prefix_reuse"])
    res = {"benchmark": args.name, "model": args.model, "explanation": EXPLANATION,
           "machine": info, "default": default}

    if args.long_prefix:
        requests, long_prefix, n_examples = long_prefix_requests(EXPLANATION, records,
                                                                 example_windows, tokenizer)
        ltimes, lres = alternate(backends, lambda b: b.prompt_logprobs(requests), args.rounds,
                                 time.perf_counter() + args.budget_s, device, args.verbose,
                                 "long-prefix")
        lp = backends["naive"].count_tokens(long_prefix)
        res["long_prefix"] = {
            "label": f"NOT the headline: a longer prefix, {n_examples} few-shot example neurons "
                     f"(the built-in ones plus {len(EXTRA_FEWSHOT)} with a 64-token corpus excerpt "
                     "each), same engine, called through backend.prompt_logprobs",
            "excerpts": n, "rounds": len(ltimes["naive"]), "seconds": ltimes,
            "excerpts_per_s": {k: n / statistics.median(v) for k, v in ltimes.items()},
            "ratio": paired_ratio(ltimes, "naive", "prefix_reuse"),
            "forward_tokens": {k: usage_tokens(v) for k, v in lres.items()},
            "prompt_tokens_prefix": lp,
            "max_abs_diff_probs": max(abs(a - b) for da, db in zip(lres["prefix_reuse"],
                                                                   lres["naive"])
                                      for pa, pb in zip(da.probs, db.probs)
                                      for a, b in zip(pa, pb)),
        }
    res["wall_seconds"] = time.perf_counter() - wall
    use = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    res["cpu_seconds"] = sum(u.ru_utime + u.ru_stime for u in use)
    res["machine"]["load_average_at_end"] = list(os.getloadavg())
    res["summary"] = {
        "benchmark": args.name, "ratio": round(default["ratio"], 3),
        "excerpts_per_s_prefix_reuse": round(default["excerpts_per_s"]["prefix_reuse"], 3),
        "excerpts_per_s_naive": round(default["excerpts_per_s"]["naive"], 3),
        "forward_tokens_prefix_reuse": default["forward_tokens"]["prefix_reuse"],
        "forward_tokens_naive": default["forward_tokens"]["naive"],
        "max_abs_diff_expected": float(f"{diff:.3g}"),
        "long_prefix_ratio": round(res["long_prefix"]["ratio"], 3) if args.long_prefix else None,
        "device": device, "model": args.model, "wall_seconds": round(res["wall_seconds"], 1),
    }
    save(args.name, res, markdown(res))


def markdown(res: dict) -> str:
    m, d = res["machine"], res["default"]
    lines = [
        "# Simulation benchmark", "",
        machine_line(m),
        f"Simulator model: `{res['model']}`. Explanation: \"{res['explanation']}\".", "",
        f"## Default engine config ({d['excerpts']} excerpts x {d['window']} tokens, local "
        f"backend batch {d['batch_size']}; warm-up, then {d['rounds']} alternated rounds, "
        "medians)", "",
        "| engine | excerpts/s | forward tokens (sum of usage.prompt_tokens) |",
        "|---|---:|---:|",
        f"| prefix reuse | {d['excerpts_per_s']['prefix_reuse']:.3f} | "
        f"{d['forward_tokens']['prefix_reuse']} |",
        f"| naive (full prompt per excerpt) | {d['excerpts_per_s']['naive']:.3f} | "
        f"{d['forward_tokens']['naive']} |", "",
        f"Speedup (median of paired rounds): **{d['ratio']:.2f}x**; forward-token ratio "
        f"{d['forward_token_ratio']:.2f}x. Prompt: prefix {d['prompt_tokens_prefix']} tokens, "
        f"first excerpt's suffix {d['prompt_tokens_suffix_first_excerpt']} tokens (each token "
        "line is `token<TAB>unknown\\n`; the forward also carries the candidate-trie tokens). "
        f"Max |expected value difference| between the engines: {d['max_abs_diff_expected']:.2e}. "
        f"Failed excerpts: {d['n_failed']}.", "",
    ]
    if "long_prefix" in res:
        lp = res["long_prefix"]
        lines += [
            f"## Separate figure, not the headline: longer prefix ({lp['prompt_tokens_prefix']} "
            "tokens)", "",
            lp["label"] + ".", "",
            "| engine | excerpts/s | forward tokens |", "|---|---:|---:|",
            f"| prefix reuse | {lp['excerpts_per_s']['prefix_reuse']:.3f} | "
            f"{lp['forward_tokens']['prefix_reuse']} |",
            f"| naive | {lp['excerpts_per_s']['naive']:.3f} | {lp['forward_tokens']['naive']} |",
            "", f"Speedup: **{lp['ratio']:.2f}x** ({lp['rounds']} rounds). Max |probability "
            f"difference|: {lp['max_abs_diff_probs']:.2e}.", ""]
    lines += [f"Wall time of the benchmark: {res['wall_seconds']:.0f} s (CPU time "
              f"{res['cpu_seconds']:.0f} s); load average at end "
              f"{', '.join(f'{x:.1f}' for x in m['load_average_at_end'])}. A load average above "
              "the core count means other processes shared the CPU: absolute figures are then "
              "low and noisy; the paired ratios less so.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
