"""The `neuronlens-serve` command's settings, typed once, registered as the schema of
``conf/serve.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from neuronlens.settings import register, setting

from neuronlens.serve.faults import FAULTS  # noqa: E402


@dataclass
class ServeSettings:
    """An OpenAI-compatible HTTP server over a transformers model (the `neuronlens-serve` command)."""

    model: str = setting("embedded", "HF name, local directory, .gguf file, or an embedded model name")
    host: str = setting("127.0.0.1", "the address it listens on (0.0.0.0: every interface)")
    api_key_env: str = setting("NEURONLENS_SERVE_API_KEY",
                               "the environment variable holding the key every request must send as "
                               "its bearer token, as vllm serve --api-key (unset or empty: no key)")
    allow_without_key: bool = setting(False, "listen beyond loopback without a key (anyone who can "
                                             "reach the port can use the server)")
    port: int = setting(8000, "the port (a taken one is one line, exit 2)", low=0)
    device: str = setting("auto", "where the model runs", choices=("auto", "cpu", "cuda"))
    dtype: str = setting("auto", "auto: float32 on CPU, bfloat16 on GPU",
                         choices=("auto", "float32", "bfloat16", "float16"))
    strict_model: bool = setting(True, "404 for a request naming another model, as vLLM; false: any name")
    max_logprobs: Optional[int] = setting(20, "most logprobs per token a request may ask for, as vLLM's "
                                              "--max-logprobs (a 400 above it); null: any", low=1)
    faults: List[str] = setting([], "for tests, applied to successive POST requests in a cycle",
                                choices=FAULTS)
    retry_after: float = setting(0.1, "Retry-After seconds sent with an injected 429", low=0)
    slow_seconds: float = setting(5.0, "delay of an injected `slow` answer", low=0)


register("serve", "serve_schema", ServeSettings)
