"""neuronlens-serve answering a simulator's follow-up prompts: all of one request in one forward
pass over a tree of their tokens, against the same prompts answered one by one.

With a tokenizer that writes "10" as "1" + "0" (SmolLM2's), the ``vllm`` and ``openai``
simulators ask, after each excerpt's prompt logprobs, for the greedy next token (with its top 20)
after ``prompt[:placeholder] + "1"`` for every placeholder: one ``/v1/completions`` request whose
``prompt`` is the list of those texts. Both variants answer exactly that request body with the
server's own code (``serve.handlers.complete``) on the embedded SmolLM2-135M:

- ``tree``: the request as sent (a list of prompts): their shared prefix from the backend's kept
  KV cache, the rest as one tree of tokens in one forward pass (``next_token_logprobs``);
- ``one_by_one``: each prompt of the list as a request of its own, through the server's prefix
  cache (the previous prompt's KV cache, cropped to the prefix they share), which is how the
  server answered a list before.

Each excerpt is a 32-token window of the built-in corpus simulated for one explanation. The
variants alternate (A B, B A, ...) after a warm-up, each from cold caches; the headline ``ratio``
is the median of the per-round paired ratios (one_by_one / tree). The largest difference between
the two variants' logprobs (greedy token and top 20) is reported.

Run with no arguments (about 2 minutes on 2 CPU cores). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
from itertools import islice

from common import alternate, machine, machine_line, paired_ratio, save  # benchmarks/common.py, beside this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--excerpts", type=int, default=3)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="serve_follow_ups")
    args = ap.parse_args()

    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.models import load_tokenizer
    from neuronlens.scorers.simulation import build_request
    from neuronlens.serve import CompletionBody, PrefixCache, complete, make_state

    info = machine("cpu")
    tokenizer = load_tokenizer(args.model)
    windows = list(islice(token_windows(BuiltinCorpus(), tokenizer, args.window, None), args.excerpts))
    requests = []   # one follow-up request per excerpt, as the simulator sends it
    for w in windows:
        req = build_request("numbers, dates and times", [tokenizer.decode([i]) for i in w])
        requests.append([req.prompt[:c] + "1" for c in req.positions])
    state = make_state(args.model, device="cpu")

    def body(prompt) -> CompletionBody:
        return CompletionBody(model=state.model_name, prompt=prompt, max_tokens=1, temperature=0,
                              logprobs=20)

    def answers(choices: list[dict]) -> list[tuple[str, dict]]:
        return [(c["text"], c["logprobs"]["top_logprobs"][0]) for c in choices]

    def sweep(tree: bool) -> list[tuple[str, dict]]:
        state.prefix, state.backend._kept = PrefixCache(state.backend.model), None   # cold caches
        out = []
        for prompts in requests:
            if tree:
                out += answers(complete(state, body(prompts), "none")["choices"])
            else:
                out += [a for p in prompts for a in answers(complete(state, body(p), "none")["choices"])]
        return out

    sweep(True), sweep(False)   # warm-up
    times, results = alternate({"tree": True, "one_by_one": False}, sweep, args.rounds)
    ratio = paired_ratio(times, "one_by_one", "tree")
    same_tokens = all(a[0] == b[0] for a, b in zip(results["tree"], results["one_by_one"]))
    diff = max(abs(a[1][k] - b[1][k]) for a, b in zip(results["tree"], results["one_by_one"])
               for k in a[1].keys() & b[1].keys())
    n_prompts = sum(map(len, requests))
    summary = {"benchmark": args.name, "ratio": round(ratio, 3),
               "seconds_tree": round(statistics.median(times["tree"]), 2),
               "seconds_one_by_one": round(statistics.median(times["one_by_one"]), 2),
               "requests": len(requests), "prompts": n_prompts, "same_greedy_tokens": same_tokens,
               "max_abs_diff_logprob": float(f"{diff:.3g}"), "model": args.model}
    res = {"summary": summary, "seconds": times, "machine": info}
    save(args.name, res, "\n".join([
        "# neuronlens-serve: a simulator's follow-up prompts", "", machine_line(info), "",
        f"{len(requests)} follow-up requests ({n_prompts} prompts: one per placeholder of a "
        f"{args.window}-token excerpt) on `{args.model}`, {args.rounds} alternated rounds, medians:", "",
        "| variant | seconds for all requests |", "|---|---:|",
        f"| one tree of tokens per request | {summary['seconds_tree']} |",
        f"| one prompt at a time (before) | {summary['seconds_one_by_one']} |", "",
        f"Speedup (median of paired rounds): **{ratio:.2f}x**. Same greedy tokens: {same_tokens}; "
        f"max |logprob difference| over the top 20: {diff:.2e}.", ""]))


if __name__ == "__main__":
    main()
