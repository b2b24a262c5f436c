"""GPU throughput: recording and simulation tokens/s for a random-initialised Llama-3-8B-shaped
model in bf16, against the FLOP floor.

- **Recording**: ``record`` over 64-token windows of the built-in corpus, every neuron of the
  last layer (the forward stops there, so nearly the whole model runs).
- **Simulation**: ``Simulator(LocalBackend)`` scoring 64-token excerpts for one explanation per
  round (a new explanation each round, so the kept prompt prefix is computed again), the forward
  tokens counted from the backend's ``usage`` (the tokens actually run).

The floor is the time the FLOPs need at the device's peak: 2 x parameters x tokens / peak, with
the decoder layers' parameters (the embedding is a lookup, and the LM head runs on a few rows
only; attention over 64 to ~1,000 tokens adds a few percent, not counted), so
``floor_fraction`` = floor / measured (model FLOPs utilisation). The weights are random: speed does
not depend on them. The tokenizer is the embedded SmolLM2's (vocab 49,152, not Llama 3's 128,256:
~7.5B parameters instead of 8.0B; both counted from the model itself).

    python benchmarks/gpu.py                 # on a GPU (one prepared run, ~2-3 min on an H100)
    python benchmarks/gpu.py --tiny          # anywhere: a tiny config, to test the script; not saved

Peak bf16 dense TFLOP/s is read from the device name (H100 SXM 989, H100 PCIe 756, H200 989,
A100 312, L4 121, A10 125) or given with ``--peak-tflops``; on a CPU the floor is not computed.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import machine, machine_line, save, sync  # benchmarks/common.py, beside this script

PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))
LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)


def peak_tflops(device_name: str) -> float | None:
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in device_name:
            return tflops
    return None


def significant(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.3g}")


def build(shape: dict, tokenizer, device: str, dtype):
    """A random-initialised Llama of ``shape`` on ``device``, made there directly."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny config (tests the script); not saved")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--tokenizer", default="embedded", help="HF name, directory, or 'embedded'")
    p.add_argument("--windows", type=int, default=512, help="64-token windows to record")
    p.add_argument("--batch-size", type=int, default=64, help="recording batch (windows)")
    p.add_argument("--excerpts", type=int, default=64, help="excerpts simulated per round")
    p.add_argument("--sim-batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--name", default="gpu", help="results file stem under results/")
    args = p.parse_args()
    if args.tiny:
        args.windows, args.batch_size, args.excerpts, args.sim_batch_size, args.rounds = 8, 4, 4, 4, 2

    import torch

    from neuronlens.backends.local import LocalBackend
    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.models import load_model, pick_device
    from neuronlens.records import ActivationRecord, NeuronId
    from neuronlens.scorers.simulation import Simulator
    from neuronlens.subject.hooks import n_layers, n_neurons
    from neuronlens.subject.recording import RecordingConfig, record

    wall = time.perf_counter()
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    info = machine(device)
    if args.tokenizer == "embedded":
        _, tokenizer = load_model("embedded", "cpu")
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model = build(TINY if args.tiny else LLAMA_3_8B, tokenizer, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    # the matmuls: the decoder layers' weights (the embedding is a lookup, and neither recording
    # nor simulation runs the LM head over more than a few rows)
    body = sum(p.numel() for p in model.model.layers.parameters())
    peak = args.peak_tflops or (peak_tflops(info.get("gpu", "")) if device.startswith("cuda") else None)

    windows = list(token_windows(BuiltinCorpus(), tokenizer, window=64, max_windows=args.windows))
    while len(windows) < args.windows:   # the built-in corpus cycled if it is short
        windows += windows[:args.windows - len(windows)]
    last = [NeuronId(n_layers(model) - 1, i) for i in range(n_neurons(model))]
    config = RecordingConfig(batch_size=args.batch_size)

    def record_all(ws) -> None:
        record(model, tokenizer, ws, last, config, progress=False)
        sync(device)

    record_all(windows[:args.batch_size])   # warm-up: kernels, allocator
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        record_all(windows)
        times.append(time.perf_counter() - start)
    rec_tokens = len(windows) * 64
    rec_s = statistics.median(times)
    recording = {"tokens": rec_tokens, "seconds": times, "tokens_per_s": rec_tokens / rec_s,
                 "units": len(last), "batch_windows": args.batch_size}

    backend = LocalBackend("gpu-benchmark", device, batch_size=args.sim_batch_size)
    backend.model, backend.tokenizer = model, tokenizer   # the random model, not a file
    simulator = Simulator(backend)
    excerpts = [ActivationRecord([tokenizer.decode([i]) for i in w], [0.0] * len(w))
                for w in windows[:args.excerpts]]
    simulator.simulate("warm-up", excerpts[:2])
    sim_times, sim_tokens = [], []
    for r in range(args.rounds):
        start = time.perf_counter()
        result = simulator.simulate(f"words about topic number {r}", excerpts)
        sync(device)
        sim_times.append(time.perf_counter() - start)
        sim_tokens.append(result.usage.prompt_tokens)
        if result.n_failed:
            raise RuntimeError(f"{result.n_failed} excerpts failed to simulate")
    sim_s, sim_tok = statistics.median(sim_times), statistics.median(sim_tokens)
    simulation = {"excerpts": len(excerpts), "forward_tokens": sim_tokens, "seconds": sim_times,
                  "tokens_per_s": sim_tok / sim_s, "excerpts_per_s": len(excerpts) / sim_s}

    def floor(tokens: float, n_params: int, seconds: float) -> dict:
        if not peak:
            return {"floor_seconds": None, "floor_fraction": None}
        need = 2 * n_params * tokens / (peak * 1e12)
        return {"floor_seconds": need, "floor_fraction": need / seconds}

    recording |= floor(rec_tokens, body, rec_s)
    simulation |= floor(sim_tok, body, sim_s)
    summary = {"benchmark": "gpu", "device": info.get("gpu", device), "dtype": str(dtype).split(".")[-1],
               "params": params, "peak_tflops": peak,
               "record_tokens_per_s": round(recording["tokens_per_s"], 1),
               "record_floor_fraction": significant(recording["floor_fraction"]),
               "simulate_tokens_per_s": round(simulation["tokens_per_s"], 1),
               "simulate_floor_fraction": significant(simulation["floor_fraction"]),
               "tiny": args.tiny, "wall_seconds": round(time.perf_counter() - wall, 1)}
    summary["matmul_params"] = body
    result = {"summary": summary, "machine": info, "recording": recording, "simulation": simulation,
              "shape": TINY if args.tiny else LLAMA_3_8B}
    if args.tiny:
        print(json.dumps(summary))
        return
    frac = lambda x: "n/a" if x is None else f"{x:.1%}"   # noqa: E731
    markdown = "\n".join([
        "# GPU throughput (`python benchmarks/gpu.py`)", "", machine_line(info), "",
        f"Random-initialised Llama-3-8B shape, {params / 1e9:.2f}B parameters, {summary['dtype']}; "
        f"peak {peak} TFLOP/s (bf16 dense).", "",
        "| phase | tokens/s | floor (2 x params x tokens / peak) / measured |", "|---|---:|---:|",
        f"| recording (all {len(last)} neurons of the last layer) | {recording['tokens_per_s']:.0f} | "
        f"{frac(recording['floor_fraction'])} |",
        f"| simulation ({len(excerpts)} excerpts, forward tokens) | {simulation['tokens_per_s']:.0f} | "
        f"{frac(simulation['floor_fraction'])} |", "",
        f"Wall time of the benchmark: {summary['wall_seconds']:.0f} s.", ""])
    save(args.name, result, markdown)


if __name__ == "__main__":
    main()
