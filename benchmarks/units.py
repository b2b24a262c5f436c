"""SAE latents against MLP neurons, on the same model, layer and corpus.

1. **Recording throughput.** Every MLP neuron of the embedded SmolLM2-135M's middle layer (1,536)
   against every latent of an SAE reading the residual stream after that layer (``--sae DIR``,
   e.g. the one `neuronlens-sae` trains; without it a random top-k SAE of 8 x 576 latents in
   sparsify's format), recorded over the same windows, alternately ``--repeats`` times each;
   the ratio is the median over rounds of latents' tokens/s over neurons' (goal: at least 0.9).
2. **Peak memory of a wide SAE.** A child process records a random ``--wide``-latent SAE
   (65,536 by default) and another the layer's neurons, over a few windows; their peak resident
   memory (ru_maxrss), beside the recorder's own state as ``subject/recording.py`` states it.
3. **How interpretable** (``--compare N``, with ``--sae``): the default pipeline (explainer,
   simulator and the similarity judge all the embedded model) on N random live latents of the SAE
   and N random neurons of the layer; the difference of mean test scores per judge with a
   bootstrap 95% interval (unpaired: different units), beside each judge's power on the control
   neurons. A difference whose interval holds 0 says nothing.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import judge_score, machine, machine_line, power_cell, run_pipeline, save  # beside this script

LAYER = 15


def random_sae(path: Path, d_in: int, latents: int, k: int = 32, seed: int = 0) -> Path:
    """A random top-k SAE on layers.LAYER, saved as sparsify saves one."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder = path / f"layers.{LAYER}"
    folder.mkdir(parents=True, exist_ok=True)
    W = torch.randn(latents, d_in, generator=g) / d_in ** 0.5
    save_file({"encoder.weight": W, "encoder.bias": torch.zeros(latents), "W_dec": W.clone(),
               "b_dec": torch.zeros(d_in)}, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": k, "num_latents": latents,
                                                 "expansion_factor": latents // d_in, "transcode": False,
                                                 "d_in": d_in}))
    return path


def setup(windows: int):
    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.models import load_model

    model, tokenizer = load_model("embedded", "cpu", "auto")
    return model, tokenizer, list(token_windows(BuiltinCorpus(), tokenizer, 64, windows))


def record_layer(model, tokenizer, windows, sae_dir: Path | None):
    """Record every unit of LAYER: its neurons (``sae_dir`` None) or the SAE's latents."""
    from neuronlens.records import NeuronId
    from neuronlens.subject.hooks import hook_point
    from neuronlens.subject.recording import RecordingConfig, record
    from neuronlens.subject.sae import load_coders

    point = load_coders(sae_dir)[LAYER].point(model) if sae_dir else hook_point(model, LAYER)
    units = [NeuronId(LAYER, i) for i in range(point.width)]
    start = time.perf_counter()
    rec = record(model, tokenizer, windows, units, RecordingConfig(top_k=32, n_random=32, batch_size=16),
                 progress=False, points={LAYER: point})
    return rec, time.perf_counter() - start


def child(kind: str, windows: int, wide: int) -> None:
    """Record in this process and print its peak resident memory (MB)."""
    model, tokenizer, win = setup(windows)
    with tempfile.TemporaryDirectory() as tmp:
        sae = random_sae(Path(tmp), model.config.hidden_size, wide) if kind == "wide" else None
        record_layer(model, tokenizer, win, sae)
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak(kind: str, windows: int, wide: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--windows", str(windows),
                          "--wide", str(wide)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def compare(sae: Path, live: list[int], n: int, seed: int) -> dict:
    """The default pipeline on ``n`` random live latents and ``n`` random neurons of LAYER."""
    from neuronlens.stats import difference, summarise

    latents = sorted(random.Random(seed).sample(live, min(n, len(live))))
    base = ["progress=false", f"seed={seed}", f"neurons.layers=[{LAYER}]"]
    with tempfile.TemporaryDirectory() as tmp:
        on_neurons, neuron_rows = run_pipeline(base + [f"neurons.per_layer={n}"], Path(tmp) / "neurons")
        _, latent_rows = run_pipeline(base + ["subject=sae", f"subject.path={sae}", "neurons.which=list",
                                                 f"neurons.indices=[{','.join(map(str, latents))}]",
                                                 "judge_power.enabled=false"], Path(tmp) / "latents")
    out = {}
    for judge in ["simulator", *sorted(on_neurons.get("judges") or {})]:
        a = [s for r in latent_rows.values() if (s := judge_score(r, judge)) is not None]
        b = [s for r in neuron_rows.values() if (s := judge_score(r, judge)) is not None]
        d = difference(a, b)
        power = (on_neurons.get("judge_power") or {}).get(judge) or {}
        out[judge] = {"latents": summarise(a).mean, "neurons": summarise(b).mean, "n_latents": len(a),
                      "n_neurons": len(b), "difference": d.mean_diff,
                      "ci": None if d.ci is None else [d.ci.low, d.ci.high], "mann_whitney_p": d.p,
                      "power_difference": power.get("difference"), "power_ci": power.get("difference_ci"),
                      "has_power": power.get("tells_apart")}
    return {"latents": latents, "judges": out,
            "explanations": {"latents": {i: r.get("explanation") for (_, i), r in latent_rows.items()},
                             "neurons": {i: r.get("explanation") for (_, i), r in neuron_rows.items()}}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", type=Path, help="an SAE (folder) reading layers.15, e.g. <neuronlens-sae run>/sae")
    p.add_argument("--windows", type=int, default=160, help="64-token windows recorded per pass")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--wide", type=int, default=65536, help="latents of the wide SAE whose memory is measured")
    p.add_argument("--compare", type=int, default=0, help="units per side of the interpretability comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="units")
    p.add_argument("--child", choices=("wide", "neurons"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, 8, args.wide)

    wall = time.perf_counter()
    model, tokenizer, windows = setup(args.windows)
    tokens = len(windows) * 64
    with tempfile.TemporaryDirectory() as tmp:
        sae = args.sae or random_sae(Path(tmp), model.config.hidden_size, 8 * model.config.hidden_size)
        record_layer(model, tokenizer, windows[:16], sae)   # warm-up of both paths
        record_layer(model, tokenizer, windows[:16], None)
        times = {"neurons": [], "latents": []}
        for _ in range(args.repeats):
            rec, t = record_layer(model, tokenizer, windows, sae)
            times["latents"].append(t)
            times["neurons"].append(record_layer(model, tokenizer, windows, None)[1])
        width = len(rec.neurons)
        live = [n.index for n, m in zip(rec.neurons, rec.top_max[:, 0].tolist()) if m > 0]
    neurons_s, latents_s = statistics.median(times["neurons"]), statistics.median(times["latents"])
    memory = {"wide_latents": args.wide, "wide_peak_mb": round(peak("wide", 8, args.wide)),
              "neurons_peak_mb": round(peak("neurons", 8, args.wide)),
              "wide_state_mb": round(args.wide * (32 + 32) * 64 * 4 / 2**20 + (args.wide * 32 + 32) * 64 * 4 / 2**20)}
    res = {"machine": machine("cpu"), "sae": str(args.sae) if args.sae else f"random top-k, {width} latents",
           "latents": width, "live_latents": len(live), "neurons": model.config.intermediate_size,
           "tokens": tokens, "seconds": times, "latents_tokens_per_s": tokens / latents_s,
           "neurons_tokens_per_s": tokens / neurons_s, "memory": memory,
           # the median of the per-round paired ratios (each round: latents, then neurons)
           "ratio": statistics.median(n / l for n, l in zip(times["neurons"], times["latents"]))}
    if args.compare:
        if not args.sae:
            raise SystemExit("--compare needs --sae (a trained SAE: random latents explain nothing)")
        res["compare"] = compare(args.sae, live, args.compare, args.seed)
    res["wall_seconds"] = time.perf_counter() - wall
    res["summary"] = {"benchmark": args.name, "ratio": round(res["ratio"], 3), "latents": width,
                      "live_latents": len(live), "latents_tokens_per_s": round(res["latents_tokens_per_s"], 1),
                      "neurons_tokens_per_s": round(res["neurons_tokens_per_s"], 1), **memory,
                      **({f"{j}_difference": None if v["difference"] is None else round(v["difference"], 4)
                          for j, v in res["compare"]["judges"].items()} if args.compare else {}),
                      **({f"{j}_ci": None if v["ci"] is None else [round(x, 4) for x in v["ci"]]
                          for j, v in res["compare"]["judges"].items()} if args.compare else {}),
                      "wall_seconds": round(res["wall_seconds"], 1)}
    save(args.name, res, markdown(res))


def markdown(res: dict) -> str:
    mem = res["memory"]
    lines = ["# SAE latents against MLP neurons (`python benchmarks/units.py`)", "",
             machine_line(res["machine"]), "",
             f"Layer {LAYER} of the embedded SmolLM2-135M, {res['tokens']} tokens of the built-in corpus per "
             f"pass, {len(res['seconds']['neurons'])} rounds of alternating passes (latents, then neurons).", "",
             "| units | count | seconds (median) | tokens/s |", "|---|---:|---:|---:|",
             f"| MLP neurons | {res['neurons']} | {statistics.median(res['seconds']['neurons']):.1f} | "
             f"{res['neurons_tokens_per_s']:.0f} |",
             f"| SAE latents ({res['sae']}) | {res['latents']} ({res['live_latents']} fire) | "
             f"{statistics.median(res['seconds']['latents']):.1f} | {res['latents_tokens_per_s']:.0f} |", "",
             f"Latents record at **{res['ratio']:.2f}x** the neurons' speed (the median of the rounds' paired "
             "ratios; goal: at least 0.9).", "",
             f"Peak memory (ru_maxrss of a process that loads the model and records 8 windows): "
             f"{mem['wide_latents']} random latents {mem['wide_peak_mb']} MB, the layer's neurons "
             f"{mem['neurons_peak_mb']} MB; the recorder's state for that many latents is "
             f"{mem['wide_state_mb']} MB by `subject/recording.py`'s formula."]
    if "compare" in res:
        lines += ["", f"## How interpretable, by each judge ({len(res['compare']['latents'])} random live latents "
                  "against as many random neurons of the layer)", "",
                  "| judge | latents | neurons | latents - neurons [95% CI] | Mann-Whitney p | judge power |",
                  "|---|---:|---:|---|---:|---|"]
        for judge, v in res["compare"]["judges"].items():
            ci = "" if v["ci"] is None else f" [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"
            diff = "–" if v["difference"] is None else f"{v['difference']:+.3f}{ci}"
            power = power_cell(v)
            p = "–" if v["mann_whitney_p"] is None else f"{v['mann_whitney_p']:.3f}"
            fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
            lines.append(f"| {judge} | {fmt(v['latents'])} (n {v['n_latents']}) | {fmt(v['neurons'])} "
                         f"(n {v['n_neurons']}) | {diff} | {p} | {power} |")
        lines += ["", "A difference whose interval holds 0 is no evidence either way."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
