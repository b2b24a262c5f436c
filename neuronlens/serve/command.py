"""The `neuronlens-serve` command: a Hydra app over ``conf/serve.yaml`` (its settings:
``serve/settings.py``) that serves until stopped."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from neuronlens.cli import Command, fail_cleanly, run_command


def task(cfg: DictConfig, run_dir: Path) -> None:
    from neuronlens.serve.server import serve

    fail_cleanly(lambda: serve(cfg))


ABOUT = """an OpenAI-compatible HTTP server (/v1/models, /v1/completions with echo and
logprobs, /v1/chat/completions) over a transformers model in this process, answering as
`vllm serve` does: a local stand-in for a vLLM server, for the remote backends and their tests."""

EXAMPLES = [
    ("neuronlens-serve", "the embedded SmolLM2-135M-Instruct on 127.0.0.1:8000"),
    ("neuronlens-serve port=8001 model=HuggingFaceTB/SmolLM2-360M-Instruct", "any HF name or dir"),
    ("neuronlens-serve model=/path/to/model.gguf device=cuda", "a GGUF file, on a GPU"),
    ("neuronlens-serve faults=[429,slow] slow_seconds=2", "misbehave, to test a client"),
    ("neuronlens simulator=vllm simulator.base_url=http://127.0.0.1:8000/v1 simulator.model=embedded",
     "then score against it"),
]

SERVE = Command("neuronlens-serve", "serve", ABOUT, EXAMPLES, (), task)


def main() -> None:
    run_command(SERVE)


if __name__ == "__main__":
    main()
