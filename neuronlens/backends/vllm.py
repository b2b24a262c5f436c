"""vLLM backends: a ``vllm serve`` OpenAI-compatible server, or vLLM's in-process ``LLM`` engine.

Prompt scoring uses vLLM's ``prompt_logprobs=k`` extension: for every prompt token i > 0 the
server returns the top-k (plus the actual token) with ``decoded_token`` strings, and the prompt's
``prompt_token_ids``. Positions map to characters by decoding: the actual tokens' decoded texts,
concatenated, must rebuild the end of the prompt exactly (the first token, or a BOS with no text, covers what is
left), except that tokens holding part of a multi-byte character are skipped (see ``align``). A
prompt that does not rebuild is refused as misaligned, never guessed.
Candidates are then scored as in ``remote_scoring.py``.
"""

from __future__ import annotations

from typing import Any, Sequence

from neuronlens.backends.base import (
    Backend,
    BackendError,
    Capabilities,
    Completion,
    GenerateRequest,
    Generation,
    PromptLogprobRequest,
    TokenDistributions,
    TokenLogprob,
    TransientError,
    Usage,
)
from neuronlens.backends.openai import OpenAIBackend
from neuronlens.backends.remote_scoring import PromptToken, score
from neuronlens.errors import UserError

MISSING_VLLM = 'vLLM is not installed; pip install "neuronlens[vllm]" on a machine with a GPU.'


def by_text(entry: dict[str, dict]) -> dict[str, float]:
    """``{"<id>": {"logprob", "decoded_token", ...}}`` as ``{decoded_token: logprob}``; of two
    ids that decode alike, the likelier one."""
    top: dict[str, float] = {}
    for e in sorted(entry.values(), key=lambda e: -e["logprob"]):
        top.setdefault(e["decoded_token"], float(e["logprob"]))
    return top


def vllm_prompt_tokens(data: dict, prompt: str) -> list[PromptToken]:
    """Start offsets and top-k per prompt token from a completions answer with
    ``prompt_logprobs`` (``[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]``)."""
    choice = data["choices"][0]
    entries = choice["prompt_logprobs"]
    ids = choice.get("prompt_token_ids") or data.get("prompt_token_ids")
    if ids is None:
        raise BackendError("The vLLM server returned prompt_logprobs without prompt_token_ids; "
                           "use a vLLM version that supports return_token_ids.")
    if not ids or len(entries) != len(ids):
        raise TransientError(f"Prompt logprobs are misaligned: {len(entries)} entries for "
                             f"{len(ids)} prompt tokens.")
    texts, tops = [], []
    for token_id, entry in zip(ids[1:], entries[1:]):
        texts.append(entry[str(token_id)]["decoded_token"])
        tops.append(by_text(entry))
    tokens = [PromptToken(0, {})]
    tokens += [PromptToken(at, top) for at, top in zip(align(texts, prompt), tops)]
    return tokens


def align(texts: list[str], prompt: str) -> list[int]:
    """Start offsets in ``prompt`` of consecutive tokens whose decoded texts are ``texts`` and
    which end the prompt, matched from the end. A token holding part of a multi-byte character
    decodes on its own to U+FFFD; a run of such tokens is skipped to the previous clean token,
    and the run's tokens start where that token ends (no placeholder ever falls inside one)."""
    starts, end, i = [0] * len(texts), len(prompt), len(texts) - 1
    while i >= 0:
        if "\ufffd" not in texts[i]:
            if not prompt.endswith(texts[i], 0, end):
                raise TransientError("Prompt tokens are misaligned: their decoded texts do not "
                                     "rebuild the prompt.")
            end -= len(texts[i])
            starts[i], i = end, i - 1
            continue
        last = i
        while i >= 0 and "\ufffd" in texts[i]:
            i -= 1
        resume = 0 if i < 0 else prompt.rfind(texts[i], 0, end - 1) + len(texts[i])
        if i >= 0 and resume < len(texts[i]):
            raise TransientError("Prompt tokens are misaligned around an undecodable token.")
        starts[i + 1:last + 1] = [resume] * (last - i)
        end = resume
    return starts


class VLLMBackend(OpenAIBackend):
    """A ``vllm serve MODEL`` server at ``base_url``: chat, completions and prompt logprobs.
    ``top_logprobs`` may not exceed the server's ``--max-logprobs`` (20 by default)."""

    kind = "vllm"
    key_env = "VLLM_API_KEY"   # only if the server was started with --api-key; never OpenAI's key

    def __init__(self, model: str = "meta-llama/Llama-3.1-8B-Instruct", base_url: str | None = None,
                 timeout: float = 60.0, top_logprobs: int = 20, context_length: int = 8192,
                 chat: bool = True, completion: bool = True):
        if not base_url:
            raise UserError("The vllm backend needs base_url, the address of `vllm serve` "
                            "(e.g. http://localhost:8000/v1).")
        super().__init__(model, base_url, timeout, top_logprobs, "none", context_length, chat,
                         completion)

    @property
    def _scores_prompts(self) -> bool:
        return True

    def _prompt_tokens(self, prompt: str) -> tuple[list[PromptToken], Usage]:
        return self._call("completions", vllm_prompt_tokens, prompt, prompt=prompt, max_tokens=1,
                          temperature=0, extra_body={"prompt_logprobs": self.top_logprobs,
                                                     "return_token_ids": True})


# ---- the in-process engine --------------------------------------------------------------------
def _entry(logprobs: Any) -> dict[str, dict]:
    """A vLLM ``{token_id: Logprob}`` as the server's JSON entry."""
    return {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
            for t, lp in logprobs.items()}


class VLLMEngineBackend(Backend):
    """vLLM's ``LLM`` engine in this process (a GPU machine), with prefix caching."""

    def __init__(self, model: str = "meta-llama/Llama-3.1-8B-Instruct", top_logprobs: int = 20,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto"):
        self.model, self.top_logprobs, self.dtype = model, top_logprobs, dtype
        self.tensor_parallel_size, self.gpu_memory_utilization = tensor_parallel_size, gpu_memory_utilization
        self.max_model_len = max_model_len
        self.llm = self._params = None

    @property
    def name(self) -> str:
        return f"vllm-engine:{self.model}"

    def identity(self) -> dict:
        return {"backend": "vllm-engine", "model": self.model, "dtype": self.dtype,
                "top_logprobs": self.top_logprobs}

    def load(self) -> None:
        if self.llm is not None:
            return
        try:
            import vllm
        except ImportError as e:
            raise BackendError(MISSING_VLLM) from e
        self.llm = vllm.LLM(model=self.model, dtype=self.dtype, enable_prefix_caching=True,
                            tensor_parallel_size=self.tensor_parallel_size,
                            gpu_memory_utilization=self.gpu_memory_utilization,
                            max_model_len=self.max_model_len,
                            max_logprobs=max(20, self.top_logprobs))
        self._params = vllm.SamplingParams

    @property
    def capabilities(self) -> Capabilities:
        self.load()
        return Capabilities(chat=True, completion=True, output_logprobs=self.top_logprobs > 0,
                            prompt_logprobs=True,
                            context_length=self.llm.llm_engine.model_config.max_model_len)

    def generate(self, request: GenerateRequest) -> Generation:
        self.load()
        k = min(request.top_logprobs, self.top_logprobs)
        params = self._params(n=request.n, temperature=request.temperature, seed=request.seed,
                              max_tokens=request.max_tokens, stop=list(request.stop) or None,
                              logprobs=k or None)
        if request.prompt is not None:
            out = self.llm.generate([request.prompt], params, use_tqdm=False)[0]
        else:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            out = self.llm.chat(messages, params, use_tqdm=False)[0]
        completions = []
        for c in out.outputs:
            logprobs = None
            if k:
                logprobs = tuple(
                    TokenLogprob(step[t].decoded_token, step[t].logprob,
                                 tuple((lp.decoded_token, lp.logprob)
                                       for lp in sorted(step.values(), key=lambda lp: -lp.logprob)))
                    for t, step in zip(c.token_ids, c.logprobs))
            completions.append(Completion(c.text, logprobs,
                                          "length" if c.finish_reason == "length" else "stop"))
        return Generation(tuple(completions), Usage(len(out.prompt_token_ids),
                                                    sum(len(c.token_ids) for c in out.outputs)))

    def _first_tops(self, texts: list[str]) -> list[dict[str, float]]:
        params = self._params(max_tokens=1, temperature=0, logprobs=self.top_logprobs)
        outs = self.llm.generate(texts, params, use_tqdm=False)
        return [by_text(_entry(o.outputs[0].logprobs[0])) for o in outs]

    def prompt_logprobs(self, requests: Sequence[PromptLogprobRequest]) -> list[TokenDistributions]:
        self.load()
        params = self._params(prompt_logprobs=self.top_logprobs, max_tokens=1, temperature=0)
        outs = self.llm.generate([r.prompt for r in requests], params, use_tqdm=False)
        results = []
        for r, out in zip(requests, outs):
            entries = [None] + [_entry(e) for e in list(out.prompt_logprobs)[1:]]
            data = {"choices": [{"prompt_logprobs": entries,
                                 "prompt_token_ids": list(out.prompt_token_ids)}]}
            probs, mass = score(r, vllm_prompt_tokens(data, r.prompt), self._first_tops)
            results.append(TokenDistributions(probs, mass, Usage(len(out.prompt_token_ids), 1)))
        return results
