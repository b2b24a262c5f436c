"""What the benchmark scripts share: where results go, and the machine they ran on."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# the explanations the simulation-throughput benchmarks simulate, one per neuron in turn
MASS = 0.05   # the candidates' probability from which expected values are compared (as the tests do)
EXPLANATIONS = ("numbers, dates and times", "words about food and cooking", "the end of a sentence")


def machine(device: str) -> dict:
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    info = {"cpu_model": cpu, "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "device": device, "load_average_at_start": list(os.getloadavg())}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine_line(m: dict) -> str:
    """The machine, in one Markdown sentence, for the head of a results file."""
    gpu = f" ({m['gpu']})" if "gpu" in m else ""
    load = ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
    return (f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable, "
            f"{m['torch_threads']} torch threads), torch {m['torch']}, transformers "
            f"{m['transformers']}, device `{m['device']}`{gpu}; load average at start {load}.")


def save(name: str, result: dict, markdown) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (``markdown``: the text, or a
    function of ``result`` called once the JSON is safe on disk); print the headline JSON line
    (``result["summary"]``) last."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result) if callable(markdown) else markdown)
    print(json.dumps(result["summary"]))


def alternate(engines: dict, run, rounds: int, deadline: float = math.inf, device: str = "cpu",
              verbose: bool = False, label: str = ""):
    """``run(engine)`` for each engine once per round, alternating the order (A B, B A, ...);
    after two rounds, stop when another round would pass the deadline. Returns the seconds of
    every run by engine name and each engine's last result."""
    names = list(engines)
    times = {n: [] for n in names}
    results = {}
    start = time.perf_counter()
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            sync(device)
            t = time.perf_counter()
            results[name] = run(engines[name])
            sync(device)
            times[name].append(time.perf_counter() - t)
        if verbose:
            print(f"{label} round {r}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in names),
                  file=sys.stderr)
        per_round = (time.perf_counter() - start) / (r + 1)
        if r + 1 >= 2 and time.perf_counter() + per_round > deadline:
            break  # one more round would overrun the time budget
    return times, results


def paired_ratio(times: dict, slow: str, fast: str) -> float:
    """The median over rounds of each round's time of ``slow`` over that of ``fast``."""
    return statistics.median(s / f for s, f in zip(times[slow], times[fast]))


def run_pipeline(overrides: list[str], run_dir: Path) -> tuple[dict, dict]:
    """The `neuronlens` run of ``overrides`` in ``run_dir``: its summary and its rows by (layer, index)."""
    from hydra import compose, initialize_config_dir

    import neuronlens.pipeline as pipeline
    from neuronlens.conf import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    summary = pipeline.run(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "neurons.jsonl").read_text().splitlines()]
    return summary, {(r["layer"], r["index"]): r for r in rows}


def judge_score(row: dict, judge: str) -> float | None:
    """A row's test score by the simulator (``judge == "simulator"``) or by a second judge."""
    return row.get("score") if judge == "simulator" else ((row.get("judges") or {}).get(judge) or {}).get("score")


def power_cell(v: dict) -> str:
    """A judge's power on the control neurons (``power_difference``, ``power_ci``, ``has_power``),
    for a Markdown table."""
    if v["power_difference"] is None:
        return "–"
    ci = "[–]" if v["power_ci"] is None else f"[{v['power_ci'][0]:+.3f}, {v['power_ci'][1]:+.3f}]"
    return f"{v['power_difference']:+.3f} {ci}" + ("" if v["has_power"] else ": no power, its difference says nothing")


def paired_by_judge(after: dict, before: dict, judges: list[str], power: dict) -> dict:
    """Per judge, the paired difference of test scores ``after`` minus ``before`` (rows by
    (layer, index)) over the neurons both scored, with its bootstrap interval and Wilcoxon p,
    beside the judge's ``power`` on the control neurons (a run's ``judge_power``)."""
    from neuronlens.stats import paired

    keys = sorted(after.keys() & before.keys())
    out = {}
    for judge in judges:
        pairs = [(judge_score(after[k], judge), judge_score(before[k], judge)) for k in keys]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        d = paired([a for a, _ in pairs], [b for _, b in pairs])
        p = (power or {}).get(judge) or {}
        out[judge] = {"n": d.n, "mean_after": sum(a for a, _ in pairs) / max(len(pairs), 1),
                      "mean_before": sum(b for _, b in pairs) / max(len(pairs), 1),
                      "difference": d.mean_diff, "ci": None if d.ci is None else [d.ci.low, d.ci.high],
                      "wilcoxon_p": d.wilcoxon_p, "power_difference": p.get("difference"),
                      "power_ci": p.get("difference_ci"), "has_power": p.get("tells_apart")}
    return out


# ---- simulation through a server: real_vllm.py and throughput.py --------------------------------

def excerpts(n: int, window: int, model: str = "embedded") -> list:
    from neuronlens.corpus import BuiltinCorpus
    from neuronlens.records import ActivationRecord
    from neuronlens.models import load_tokenizer

    tok = load_tokenizer(model)
    out = []
    for text in BuiltinCorpus().texts():
        ids = tok(text)["input_ids"]
        for start in range(0, len(ids) - window + 1, window):
            piece = [tok.decode([i]) for i in ids[start:start + window]]
            out.append(ActivationRecord(piece, [0.0] * window))
            if len(out) == n:
                return out
    return out


def simulate_all(simulator, records_per_neuron, in_flight: int = 1) -> dict:
    """Simulate each neuron's records with its explanation (``in_flight`` neurons at once from as
    many threads, as a run's ``concurrency`` does): seconds, failures, prompt tokens, and per
    neuron, excerpt and token the expected value, whether "1" was reported, and whether the
    candidates held at least ``MASS`` of the probability (below it, renormalising a top-k's small
    remainder turns float noise into large differences)."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    failed, kinds, prompt_tokens, expected, reported, massive, bound = 0, {}, 0, [], [], [], 0.0
    with ThreadPoolExecutor(in_flight) as pool:
        sims = list(pool.map(lambda job: simulator.simulate(*job),
                             zip(cycle(EXPLANATIONS), records_per_neuron)))
    for sim in sims:
        failed += sim.n_failed
        prompt_tokens += sim.usage.prompt_tokens
        expected.append(sim.expected)
        reported.append([None if d is None else [p[1] > 0 for p in d] for d in sim.distributions])
        massive.append([[m >= MASS for m in ms] if ms else None for ms in sim.mass])
        bound = max([bound, *(b for b in sim.bound if b)])
        for f in sim.failures:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
    return {"seconds": time.perf_counter() - start, "failed_excerpts": failed,
            "failures_by_kind": kinds, "prompt_tokens_needed": prompt_tokens,
            "expected": expected, "one_reported": reported, "enough_mass": massive, "largest_bound": bound}


def largest_difference(a: list, b: list, where: list | None = None) -> float | None:
    """The largest difference between two runs' expected values on any token both scored (and,
    with ``where``, per neuron, excerpt and token, that is true there)."""
    where = where or [[None] * len(n) for n in a]
    diffs = [abs(x - y) for na, nb, nw in zip(a, b, where) for ea, eb, ew in zip(na, nb, nw) if ea and eb
             for x, y, w in zip(ea, eb, ew or [True] * len(ea)) if w]
    return max(diffs) if diffs else None


def openai_pattern(backend, records_per_neuron, concurrency: int) -> dict:
    from neuronlens.scorers.simulation import build_request

    prompts = [build_request(e, r.tokens).prompt for e, records in zip(cycle(EXPLANATIONS), records_per_neuron)
               for r in records]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(backend._prompt_tokens, prompts))
    return {"seconds": time.perf_counter() - start,
            "prompt_tokens_needed": sum(usage.prompt_tokens for _, usage in answers)}
