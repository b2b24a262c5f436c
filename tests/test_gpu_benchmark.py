"""benchmarks/gpu.py, the one prepared GPU script, run here on CPU with its tiny config: it must
record, simulate and report without a GPU, so that the few minutes of a lent GPU are spent on
figures, not on fixing the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


def test_the_gpu_benchmark_runs_on_cpu_with_a_tiny_config(tiny_llama_dir, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu",
                           "--tokenizer", str(tiny_llama_dir), "--peak-tflops", "1"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "gpu" and summary["tiny"] and summary["device"] == "cpu"
    assert summary["record_tokens_per_s"] > 0 and summary["simulate_tokens_per_s"] > 0
    # 2 x params x tokens / 1 TFLOP/s against the measured time: a tiny model is far from it
    assert 0 < summary["record_floor_fraction"] < 1 and 0 < summary["simulate_floor_fraction"] < 1
    assert 0 < summary["matmul_params"] < summary["params"]
