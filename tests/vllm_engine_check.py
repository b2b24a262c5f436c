"""Run inside the vLLM venv by tests/test_real_vllm.py: simulate excerpts with the in-process
engine (`VLLMEngineBackend`, built from its conf file) and print the expected values as JSON.

    <vllm venv>/bin/python tests/vllm_engine_check.py IN.json OUT.json
IN: {"model": DIR, "explanation": str, "tokens": [[str, ...], ...]}
OUT: the expected values, errors, mass and a chat answer; whether the candidates were read by
id; the prompt tokens sent and those computed (not served from the prefix cache); the KV block.
Then three neurons at once from three threads, as ``concurrency=3`` runs them, and one alone
after the other: the largest difference between the two, and the engine calls each took; and
whether the chat answer is ``LLM.chat``'s own.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from neuronlens.backends.base import GenerateRequest, Message
from neuronlens.records import ActivationRecord
from neuronlens.scorers.simulation import Simulator

CONF = Path(__file__).resolve().parents[1] / "conf" / "simulator" / "vllm_engine.yaml"


def main(src: str, dst: str) -> None:
    job = json.loads(Path(src).read_text())
    cfg = OmegaConf.load(CONF)
    cfg.model, cfg.dtype, cfg.max_model_len = job["model"], "float32", 4096
    cfg.engine_args = {"enforce_eager": True}
    backend = instantiate(cfg)
    sent, steps = [], backend._steps   # the prompt tokens next_token scoring sends, per batch

    def counting(prompts, asks):
        sent.append(sum(map(len, prompts)))
        return steps(prompts, asks)

    backend._steps = counting
    records = [ActivationRecord(t, [0.0] * len(t)) for t in job["tokens"]]
    sim = Simulator(backend).simulate(job["explanation"], records)
    first = {"sent": sum(sent), "batches": len(sent)}   # this simulation's
    chat = backend.generate(GenerateRequest(messages=(Message("user", "Say hello."),), max_tokens=8))
    own = backend.llm.chat([{"role": "user", "content": "Say hello."}],
                           backend._params(max_tokens=8, temperature=0), use_tqdm=False)[0].outputs[0].text

    neurons = [(f"{job['explanation']}, neuron {i}", records[i:i + 2]) for i in range(3)]
    calls = backend.gather.runs
    alone = [Simulator(backend).simulate(e, r).expected for e, r in neurons]
    calls_alone, calls = backend.gather.runs - calls, backend.gather.runs
    with ThreadPoolExecutor(len(neurons)) as pool:
        together = list(pool.map(lambda n: Simulator(backend).simulate(*n).expected, neurons))
    calls_together = backend.gather.runs - calls
    apart = max(abs(a - b) for x, y in zip(alone, together) for ea, eb in zip(x, y) for a, b in zip(ea, eb))
    Path(dst).write_text(json.dumps({"expected": sim.expected, "errors": list(sim.errors),
                                     "mass": sim.mass, "chat": chat.completions[0].text,
                                     "by_id": backend.exact_ids, **first,
                                     "computed": sim.usage.prompt_tokens, "block_size": backend.block_size,
                                     "chat_is_llm_chat": chat.completions[0].text == own,
                                     "concurrent_difference": apart, "calls_alone": calls_alone,
                                     "calls_together": calls_together}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
