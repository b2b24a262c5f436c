"""Recording throughput and peak memory.

Throughput: tokens/s of ``neuronlens.subject.recording.record`` over token windows of the built-in
corpus, against plain forward passes over the SAME batches, measured in the same run with the
variants interleaved pass by pass (the order rotates every round), after a warm-up; ratios are
medians of the per-round paired ratios:

- ``full``: the plain full model forward ``model(input_ids)`` (with the LM head);
- ``base``: the base model forward ``model.base_model(input_ids)`` (no LM head);
- ``record_last``: recording ALL neurons of the LAST layer (the headline);
- ``record_mid``: recording all neurons of the middle layer (extra information: the forward
  stops after the deepest hooked layer, so this one skips half of the model).

Recording the last layer stops the forward after that layer's MLP activation, so compared with the
full forward it saves only the last ``down_proj``, the final norm and the LM head; against the
base-model forward it has to pay for its hooks and its running top-k / reservoir / moments.

Peak memory: the same neurons recorded over a corpus and over a 4x longer one (the windows
cycled), each in a fresh subprocess. On CPU the peak RSS (``VmHWM``) is reset after the model is
loaded and warmed up, so the figure is the peak during recording (model weights included, they
are resident); ``ru_maxrss`` (whole-process peak, model loading included) is reported beside it.
On CUDA: ``torch.cuda.max_memory_allocated`` after a reset.

Run with no arguments (<= 3 min on 2 CPU cores); bigger sizes by flags. The last line printed is
one JSON object with the headline ``ratio`` = record_last tokens/s / full-forward tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from itertools import cycle, islice
from pathlib import Path

from common import (  # benchmarks/common.py, beside this script
    machine,
    machine_line,
    save,
    sync,
)

NAME = "recording"


def batches(windows, size):
    return [windows[i:i + size] for i in range(0, len(windows), size)]


# ---------------------------------------------------------------------------------------------
# memory: one child process per corpus length
# ---------------------------------------------------------------------------------------------
def _vm_hwm_kib() -> int | None:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def child_memory(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.records import NeuronId
    from neuronlens.subject.hooks import n_layers, n_neurons
    from neuronlens.models import load_model
    from neuronlens.subject.recording import RecordingConfig, record

    model, tokenizer = load_model(args.model, args.device)
    device = str(next(model.parameters()).device)
    layer = n_layers(model) - 1
    neurons = [NeuronId(layer, i) for i in range(n_neurons(model))]
    base = list(token_windows(BuiltinCorpus(), tokenizer, window=args.window,
                              max_windows=args.mem_windows))
    total = args.mem_windows * args.child_multiple
    config = RecordingConfig(top_k=args.mem_top_k, n_random=args.mem_top_k,
                             batch_size=args.mem_batch_size)
    with torch.no_grad():  # warm-up: allocator and kernels, before the peak is reset
        model.base_model(input_ids=torch.tensor(base[:config.batch_size], device=device),
                         use_cache=False)
    rss_before = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        before = _vm_hwm_kib() * 1024 if reset else None
        rss_before = before
    windows = islice(cycle(base), total)  # streamed: the corpus itself is never held 4x
    t = time.perf_counter()
    rec = record(model, tokenizer, windows, neurons, config, progress=False)
    elapsed = time.perf_counter() - t
    out = {"windows": total, "tokens": rec.n_tokens, "seconds": elapsed,
           "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out.update(kind="cuda max_memory_allocated", peak_bytes=torch.cuda.max_memory_allocated(),
                   before_bytes=before)
    elif rss_before is not None:
        out.update(kind="peak RSS (VmHWM) during recording", peak_bytes=_vm_hwm_kib() * 1024,
                   before_bytes=rss_before)
    else:  # no /proc: whole-process peak only
        out.update(kind="ru_maxrss (whole process)", peak_bytes=out["ru_maxrss_bytes"],
                   before_bytes=None)
    return out


def run_children(args, multiples: list[int]) -> list[dict]:
    """One fresh process per corpus length. On CPU they run side by side with one torch thread
    each (peak memory is per process, and this halves the wall time on 2 cores)."""
    parallel = not args.device.startswith("cuda") and (os.cpu_count() or 1) >= len(multiples)
    threads = 1 if parallel else args.threads

    def start(multiple):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-multiple", str(multiple),
               "--model", args.model, "--device", args.device, "--window", str(args.window),
               "--mem-windows", str(args.mem_windows),
               "--mem-batch-size", str(args.mem_batch_size), "--mem-top-k", str(args.mem_top_k),
               "--threads", str(threads)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(proc):
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed:\n{err[-3000:]}")
        return {**json.loads(out.strip().splitlines()[-1]), "torch_threads": threads}

    if parallel:
        procs = [start(m) for m in multiples]
        return [finish(p) for p in procs]
    return [finish(start(m)) for m in multiples]


# ---------------------------------------------------------------------------------------------
# throughput
# ---------------------------------------------------------------------------------------------
def throughput(args, model, tokenizer, device: str, deadline: float) -> dict:
    import torch

    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.records import NeuronId
    from neuronlens.subject.hooks import n_layers, n_neurons
    from neuronlens.subject.recording import RecordingConfig, record

    L, width = n_layers(model), n_neurons(model)
    last = [NeuronId(L - 1, i) for i in range(width)]
    mid = [NeuronId(L // 2, i) for i in range(width)]
    windows = list(token_windows(BuiltinCorpus(), tokenizer, window=args.window,
                                 max_windows=args.windows))
    if len(windows) < args.windows:
        windows = list(islice(cycle(windows), args.windows))
    config = RecordingConfig(batch_size=args.batch_size)
    n_tok = len(windows) * args.window

    @torch.no_grad()
    def full(ws):
        for b in batches(ws, args.batch_size):
            model(input_ids=torch.tensor(b, device=device), use_cache=False)

    @torch.no_grad()
    def base(ws):
        for b in batches(ws, args.batch_size):
            model.base_model(input_ids=torch.tensor(b, device=device), use_cache=False)

    def record_last(ws):
        record(model, tokenizer, ws, last, config, progress=False)

    def record_mid(ws):
        record(model, tokenizer, ws, mid, config, progress=False)

    # Interleaving is per pass, not per batch: record() holds its hooks for the whole call, so a
    # baseline forward cannot run inside it.
    variants = {"full": full, "base": base, "record_last": record_last, "record_mid": record_mid}
    names = list(variants)
    warm = windows[:max(1, args.batch_size // 2)]  # warm-up: kernels, allocator, first calls
    for _ in range(args.warmup):
        for name in names:
            variants[name](warm)
    sync(device)
    times = {n: [] for n in names}
    rounds_start = time.perf_counter()
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no fixed position bias
        for name in order:
            sync(device)
            t = time.perf_counter()
            variants[name](windows)
            sync(device)
            times[name].append(time.perf_counter() - t)
        if args.verbose:
            print(f"round {r}: " + ", ".join(f"{n} {n_tok / times[n][-1]:.0f} tok/s"
                                            for n in names), file=sys.stderr)
        per_round = (time.perf_counter() - rounds_start) / (r + 1)
        if r + 1 >= 2 and time.perf_counter() + per_round > deadline:
            break  # another round would overrun the time budget (recorded in the results)
    tps = {n: n_tok / statistics.median(times[n]) for n in names}

    def paired(a, b):  # per-round ratio a/b in tokens/s (= time b / time a), median over rounds
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

    return {
        "windows": len(windows), "window": args.window, "batch_size": args.batch_size,
        "tokens_per_pass": n_tok, "repeats": len(times["full"]), "repeats_asked": args.repeats,
        "warmup_rounds": args.warmup,
        "layers": L, "neurons_recorded": width, "last_layer": L - 1, "mid_layer": L // 2,
        "recording_config": {"top_k": config.top_k, "n_random": config.n_random},
        "seconds": times, "tokens_per_s": tps,
        "ratio_record_last_vs_full": paired("record_last", "full"),
        "ratio_record_last_vs_base": paired("record_last", "base"),
        "ratio_record_mid_vs_full": paired("record_mid", "full"),
        "ratio_base_vs_full": paired("base", "full"),
    }


def markdown(res: dict) -> str:
    m, t, mem = res["machine"], res["throughput"], res.get("memory")
    gib = 1 / 2**20
    lines = [
        "# Recording benchmark", "",
        machine_line(m),
        f"Model: `{res['model']}` ({t['layers']} layers, {t['neurons_recorded']} MLP neurons per "
        "layer).", "",
        f"## Throughput ({t['windows']} windows x {t['window']} tokens = {t['tokens_per_pass']} "
        f"tokens per pass, batch {t['batch_size']}; {t['warmup_rounds']} warm-up round, median of "
        f"{t['repeats']} interleaved rounds)", "",
        "| variant | tokens/s | ratio to full forward (median of paired rounds) |",
        "|---|---:|---:|",
        f"| full forward `model(ids)` | {t['tokens_per_s']['full']:.0f} | 1.00 |",
        f"| base forward `model.base_model(ids)` (no LM head) | {t['tokens_per_s']['base']:.0f} "
        f"| {t['ratio_base_vs_full']:.2f} |",
        f"| **record all {t['neurons_recorded']} neurons of layer {t['last_layer']} (last)** | "
        f"{t['tokens_per_s']['record_last']:.0f} | **{t['ratio_record_last_vs_full']:.2f}** |",
        f"| record all {t['neurons_recorded']} neurons of layer {t['mid_layer']} (middle) | "
        f"{t['tokens_per_s']['record_mid']:.0f} | {t['ratio_record_mid_vs_full']:.2f} |", "",
        f"Recording the last layer vs the base-model forward: "
        f"**{t['ratio_record_last_vs_base']:.2f}**. The forward stops after the deepest hooked "
        "layer, so for the last layer it saves only that layer's `down_proj`, the final norm and "
        "the LM head; the ratio against the full forward is helped by the LM head it skips, the "
        "ratio against the base forward is the honest cost of the hooks and the running top-k.",
        "",
    ]
    if mem:
        a, b = mem["1x"], mem["4x"]
        lines += [
            f"## Peak memory ({mem['kind']}), each length in a fresh process", "",
            f"Same {t['neurons_recorded']} neurons (layer {t['last_layer']}), top_k = n_random = "
            f"{mem['top_k']}, batch {mem['batch_size']}; the two processes ran "
            f"{'side by side' if a['torch_threads'] == 1 else 'one after the other'} with "
            f"{a['torch_threads'] or 'default'} torch thread(s) each.", "",
            "| corpus | windows | tokens | peak MiB | before recording MiB | increment MiB | "
            "ru_maxrss MiB |", "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, c in (("1x", a), ("4x", b)):
            before = c.get("before_bytes")
            lines.append(
                f"| {label} | {c['windows']} | {c['tokens']} | {c['peak_bytes'] * gib:.1f} | "
                + (f"{before * gib:.1f} | {(c['peak_bytes'] - before) * gib:.1f}" if before
                   is not None else "- | -")
                + f" | {c['ru_maxrss_bytes'] * gib:.1f} |")
        lines += ["", f"Peak 4x / 1x: **{mem['ratio_4x_vs_1x']:.3f}** (target <= 1.10)."
                  + (f" Increment over the resident model, 4x / 1x: "
                     f"{mem['increment_ratio_4x_vs_1x']:.3f}."
                     if mem.get("increment_ratio_4x_vs_1x") is not None else ""), ""]
    lines += [f"Wall time of the benchmark: {res['wall_seconds']:.0f} s (CPU time "
              f"{res['cpu_seconds']:.0f} s); load average at end "
              f"{', '.join(f'{x:.1f}' for x in m['load_average_at_end'])}. A load average above "
              "the core count means other processes shared the CPU: absolute figures are then "
              "low and noisy; the paired ratios less so.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="HF name, local path, .gguf, or 'embedded'")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--windows", type=int, default=32, help="windows per throughput pass")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="at most this many interleaved rounds")
    p.add_argument("--budget-s", type=float, default=110.0,
                   help="throughput phase: no new round (after 2) once it would pass this")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-windows", type=int, default=16, help="windows of the 1x memory corpus")
    p.add_argument("--mem-batch-size", type=int, default=8)
    p.add_argument("--mem-top-k", type=int, default=8, help="top_k and n_random for memory runs")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--name", default=NAME, help="results file stem under results/")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default, one per core)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--child-multiple", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child_multiple:
        print(json.dumps(child_memory(args)))
        return

    start = time.perf_counter()
    import torch

    from neuronlens.models import load_model, pick_device

    args.device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine(args.device)
    model, tokenizer = load_model(args.model, args.device)
    res = {"benchmark": args.name, "model": args.model, "machine": info,
           "throughput": throughput(args, model, tokenizer, args.device, start + args.budget_s)}
    del model
    if not args.no_memory:
        one, four = run_children(args, [1, 4])
        mem = {"kind": one["kind"], "top_k": args.mem_top_k, "batch_size": args.mem_batch_size,
               "1x": one, "4x": four, "ratio_4x_vs_1x": four["peak_bytes"] / one["peak_bytes"]}
        if one.get("before_bytes") is not None and one["peak_bytes"] > one["before_bytes"]:
            mem["increment_ratio_4x_vs_1x"] = ((four["peak_bytes"] - four["before_bytes"])
                                               / (one["peak_bytes"] - one["before_bytes"]))
        res["memory"] = mem
    res["wall_seconds"] = time.perf_counter() - start
    use = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    res["cpu_seconds"] = sum(u.ru_utime + u.ru_stime for u in use)
    res["machine"]["load_average_at_end"] = list(os.getloadavg())
    t = res["throughput"]
    res["summary"] = {
        "benchmark": args.name, "ratio": round(t["ratio_record_last_vs_full"], 3),
        "ratio_vs_base_forward": round(t["ratio_record_last_vs_base"], 3),
        "ratio_mid_layer_vs_full": round(t["ratio_record_mid_vs_full"], 3),
        "record_tokens_per_s": round(t["tokens_per_s"]["record_last"], 1),
        "full_forward_tokens_per_s": round(t["tokens_per_s"]["full"], 1),
        "memory_ratio_4x_vs_1x": round(res["memory"]["ratio_4x_vs_1x"], 3)
        if "memory" in res else None,
        "device": args.device, "model": args.model, "wall_seconds": round(res["wall_seconds"], 1),
    }
    save(args.name, res, markdown(res))


if __name__ == "__main__":
    main()
