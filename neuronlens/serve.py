"""`neuronlens-serve`: an OpenAI-compatible HTTP server over the local backend.

The model is loaded once at start-up and requests are answered one at a time (a lock around the
model), so many jobs can share it. Endpoints: ``GET /v1/models``; ``POST /v1/completions`` with
the legacy ``logprobs``/``echo`` prompt scoring and vLLM's ``prompt_logprobs``;
``POST /v1/chat/completions`` with ``logprobs``/``top_logprobs``; ``GET /stats`` (request counts).

Tests use it as a stand-in for a ``vllm serve`` server, so by default it answers as vLLM does:
at most ``max_logprobs`` (20) logprobs per token, a 404 for a request naming another model
(``strict_model``), ``prompt_token_ids``/``token_ids`` only when the request sets
``return_token_ids``, and in the legacy ``logprobs`` object a ``text_offset`` that is a running
sum of the returned tokens' lengths, starting with a BOS token's text where the tokenizer adds
one. Echoed prompt tokens are written as OpenAI's legacy API wrote them: a token that is not
valid UTF-8 on its own (part of a multi-byte character) reads ``bytes:\\xNN...``.

A request's prompt shares the previous one's KV cache up to where they differ (``PrefixCache``),
and a list of greedy one-token prompts is answered in one forward pass over a tree of their
tokens (``LocalBackend.next_token_logprobs``), as vLLM batches them behind its prefix cache.

``faults`` makes successive POST requests misbehave in a cycle (429, 500, slow, truncated JSON,
answers one entry short) so that clients' retry and validation paths meet a real server.
``start_server`` runs the server in a background thread, for tests and scripts.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

import httpx
import hydra
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from omegaconf import DictConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.exceptions import HTTPException
from tokenizers import decoders

from neuronlens.models import BYTE_ALPHABET
from neuronlens.backends.base import Completion, GenerateRequest, Message, TokenLogprob
from neuronlens.backends.local import LocalBackend, cache_argument
from neuronlens.conf import CONF_DIR
from neuronlens.cli import fail_cleanly
from neuronlens.errors import UserError

FAULTS = ("none", "429", "500", "slow", "truncated", "wrong_length")


# ---- request bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (top_p, user, ...)

    model: str | None = None   # vLLM: none means the served model
    temperature: float = Field(1.0, ge=0)
    n: int = Field(1, ge=1, le=16)

    @field_validator("temperature", "n", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[info.field_name].default if v is None else v
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class CompletionBody(_Body):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0)   # vLLM's extension
    return_token_ids: bool | None = None             # vLLM's: prompt_token_ids and token_ids


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_


def error_response(status: int, message: str, code: str | None = None,
                   type_: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---- the numeric core -------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptScores:
    """``logprob[j - 1]``, ``rank[j - 1]`` (1 = most likely) and ``top[j - 1]`` (k pairs of token
    id and logprob, most likely first) belong to prompt token ``j`` given tokens ``< j``."""

    logprob: list[float]
    rank: list[int]
    top: list[list[tuple[int, float]]]


@lru_cache(maxsize=1 << 20)
def _piece(tok: Any, token_id: int) -> str:
    """The text of one token (cached: a large top-k decodes the same ids over and over)."""
    return tok.decode([token_id])


@lru_cache(maxsize=1 << 20)
def _legacy_piece(tok: Any, token_id: int) -> str:
    """A token as OpenAI's legacy completions wrote it: its text, or ``bytes:\\xNN...`` (the
    hex of its bytes) where those bytes are not valid UTF-8 on their own. The bytes are known
    for byte-level BPE tokenizers; for other tokenizers and added tokens, the decoded text."""
    backend = getattr(tok, "backend_tokenizer", None)
    if token_id in tok.added_tokens_decoder or not isinstance(getattr(backend, "decoder", None),
                                                              decoders.ByteLevel):
        return _piece(tok, token_id)
    try:
        raw = bytes(BYTE_ALPHABET[c] for c in tok.convert_ids_to_tokens(token_id))
    except KeyError:   # not a byte-level piece after all
        return _piece(tok, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@torch.no_grad()
def score_prompt(model: Any, ids: list[int], k: int) -> PromptScores:
    """One forward pass over ``ids``; log-softmax in float32 at every position."""
    scores = PrefixCache(model, keep=k).run(ids, k)[0]
    return PromptScores(scores.logprob, scores.rank, [top[:k] for top in scores.top])


def _scores(logits: torch.Tensor, ids: list[int], k: int) -> PromptScores:
    """Scores of tokens ``ids[1:]`` from the logits at the positions before each."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    actual = logp.gather(1, torch.tensor(ids[1:], device=logp.device)[:, None])
    rank = (logp > actual).sum(dim=1) + 1
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    pairs = [list(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)]
    return PromptScores(actual[:, 0].tolist(), rank.tolist(), pairs)


class PrefixCache:
    """The KV cache and scores of the last prompt run, reused for the longest prefix the next
    prompt shares with it, as vLLM's automatic prefix caching does: the excerpts of one neuron
    share the instructions, examples and explanation, and a simulator's follow-up prompts share
    all but their last tokens. ``run`` returns the prompt's scores (top-``k``, ``k`` at least
    ``keep``) and the log-probabilities of the token after it."""

    def __init__(self, model: Any, keep: int = 20):
        self.model, self.keep = model, keep
        self.ids: list[int] = []
        self.kv: Any = None
        self.scores = PromptScores([], [], [])
        self.k = 0

    @torch.no_grad()
    def run(self, ids: list[int], k: int) -> tuple[PromptScores, torch.Tensor]:
        from transformers import DynamicCache

        k = max(k, self.keep)
        shared = 0
        if self.kv is not None and k <= self.k:
            limit = min(len(ids), len(self.ids)) - 1
            while shared < limit and ids[shared] == self.ids[shared]:
                shared += 1
        start = max(shared - 1, 0)   # the position before the first new token runs again
        if start:
            self.kv.crop(start - self.kv.get_seq_length())
        else:
            self.kv = DynamicCache()
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=torch.tensor([ids[start:]], device=device), use_cache=True,
                            **{cache_argument(type(self.model)): self.kv}).logits[0]
        new = _scores(logits[:-1], ids[start:], k)
        old = self.scores
        self.scores = PromptScores(old.logprob[:start] + new.logprob, old.rank[:start] + new.rank,
                                   old.top[:start] + new.top)
        self.ids, self.k = list(ids), k
        return self.scores, torch.log_softmax(logits[-1].float(), dim=-1)


# ---- the server -------------------------------------------------------------------------------
@dataclass
class ServerState:
    backend: LocalBackend
    model_name: str                    # the served name requests must use (strict_model)
    strict_model: bool = True          # like vLLM: 404 for a request naming another model
    faults: tuple[str, ...] = ()
    retry_after: float = 0.1
    slow_seconds: float = 5.0
    max_logprobs: int | None = 20      # like vLLM's --max-logprobs; None: any k
    requests: Counter = field(default_factory=Counter)       # by endpoint path
    fault_counts: Counter = field(default_factory=Counter)   # by fault name, POST requests only
    lock: threading.Lock = field(default_factory=threading.Lock)
    prefix: PrefixCache | None = None  # the last prompt's KV cache (see PrefixCache)

    def __post_init__(self) -> None:
        if self.prefix is None:
            self.prefix = PrefixCache(self.backend.model)

    def next_fault(self) -> str:
        n = sum(self.fault_counts.values())
        fault = self.faults[n % len(self.faults)] if self.faults else "none"
        self.fault_counts[fault] += 1
        return fault


def _maybe_cut(text: str, cut: bool) -> str:
    """``text`` without its last line when ``cut`` (the `wrong_length` fault)."""
    return text[:text.rstrip("\n").rfind("\n") + 1] if cut else text


def _n_within(pieces: list[str], text: str) -> int:
    """How many of the generated tokens (their texts) start inside ``text`` (a stop string may
    have cut it short)."""
    starts = list(accumulate(map(len, pieces), initial=0))
    if starts[-1] <= len(text):
        return len(pieces)
    return sum(1 for at in starts[:-1] if at < len(text))


def _within(logprobs: tuple[TokenLogprob, ...], text: str) -> tuple[TokenLogprob, ...]:
    return logprobs[:_n_within([t.token for t in logprobs], text)]


def _top_dict(pairs: Any) -> dict[str, float]:
    """The legacy ``{token: logprob}`` map; of tokens that decode alike, the most likely wins."""
    out: dict[str, float] = {}
    for token, logprob in pairs:
        out.setdefault(token, logprob)
    return out


def _generate(state: ServerState, body: _Body, max_tokens: int, k: int | None,
              prompt: str | None = None, messages: tuple[Message, ...] = ()) -> tuple[list[Completion], int, int]:
    """``n`` completions (greedy ones are generated once and repeated), prompt and completion tokens."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    n = body.n if body.temperature > 0 else 1
    request = GenerateRequest(messages=messages, prompt=prompt, max_tokens=max_tokens,
                              temperature=body.temperature, n=n, stop=stop, seed=body.seed or 0,
                              top_logprobs=0 if k is None else max(k, 1))
    gen = state.backend.generate(request)
    completions = list(gen.completions) * (body.n // n)
    return completions, gen.usage.prompt_tokens, gen.usage.completion_tokens * (body.n // n)


def _legacy_logprobs(tok: Any, c: Completion, k: int, ids: list[int],
                     scores: PromptScores | None) -> dict[str, list]:
    """The legacy ``logprobs`` object: prompt tokens first when echoed (``scores`` given), a BOS
    included. ``text_offset`` is, as vLLM computes it, the running sum of the tokens' lengths,
    so after a BOS or a ``bytes:`` token it no longer points into the text."""
    tokens, logprobs, tops = [], [], []
    if scores is not None:
        tokens = [_legacy_piece(tok, t) for t in ids]
        logprobs = [None, *scores.logprob]
        tops = [None] + [_top_dict((_legacy_piece(tok, t), v) for t, v in top[:k])
                         for top in scores.top]
    for t in _within(c.logprobs or (), c.text):
        tokens.append(t.token)
        logprobs.append(t.logprob)
        tops.append(_top_dict(t.top[:k]))
    offsets = list(accumulate(map(len, tokens[:-1]), initial=0)) if tokens else []
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def _vllm_prompt_logprobs(tok: Any, ids: list[int], k: int, scores: PromptScores) -> list[dict | None]:
    """vLLM's shape: per prompt token, the top-k at its position plus the token itself."""
    entries: list[dict | None] = [None]
    for j in range(1, len(ids)):
        entry = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": _piece(tok, t)}
                 for r, (t, v) in enumerate(scores.top[j - 1][:k])}
        entry.setdefault(str(ids[j]), {"logprob": scores.logprob[j - 1], "rank": scores.rank[j - 1],
                                       "decoded_token": _piece(tok, ids[j])})
        entries.append(entry)
    return entries


def _check_k(state: ServerState, *ks: int | None) -> None:
    limit = state.max_logprobs
    if limit is not None and any(k is not None and k > limit for k in ks):
        raise ApiError(400, f"This server returns at most {limit} logprobs per token "
                            f"(start it with a higher max_logprobs).")


def next_token(state: ServerState, ids: list[int], k: int) -> Completion:
    """The greedy one-token completion of ``ids``, as ``generate`` gives it, from the prefix
    cache (a simulator's follow-up prompts share all but their last tokens)."""
    return greedy(state.backend.tokenizer, state.prefix.run(ids, k)[1], k)


def greedy(tok: Any, logp: torch.Tensor, k: int) -> Completion:
    """The greedy token of a next-token distribution, with its top-``k`` alternatives."""
    best = int(logp.argmax())
    if best == tok.eos_token_id:   # generate() stops there: no token, no text
        return Completion("", (), "stop", ())
    top = logp.topk(min(max(k, 1), logp.shape[-1]))
    alts = tuple((_piece(tok, int(i)), float(v)) for v, i in zip(top.values, top.indices))
    piece = _piece(tok, best)
    return Completion(piece, (TokenLogprob(piece, float(logp[best]), alts),), "length", (best,))


def _one_greedy_token(body: CompletionBody) -> bool:
    return body.max_tokens == 1 and body.temperature == 0 and not body.stop


def _greedy_tokens(state: ServerState, ids: list[list[int]], k: int) -> list[Completion]:
    """Many greedy one-token completions at once (a simulator's follow-ups): one forward pass
    over a tree of their tokens, the prefix they share computed once."""
    tok = state.backend.tokenizer
    return [greedy(tok, logp, k) for logp in state.backend.next_token_logprobs(ids)]


def _complete(state: ServerState, body: CompletionBody, fault: str) -> dict:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or not all(prompts):
        raise ApiError(400, "prompt must be a non-empty string or a list of non-empty strings.")
    _check_k(state, body.logprobs, body.prompt_logprobs)
    ids = [list(state.backend.tokenizer(p)["input_ids"]) for p in prompts]
    given: list[Completion | None] = [None] * len(prompts)
    if len(prompts) > 1 and _one_greedy_token(body) and not body.echo and body.prompt_logprobs is None:
        given = _greedy_tokens(state, ids, body.logprobs or 0)
    choices, n_prompt, n_gen = [], 0, 0
    for prompt, prompt_ids, done in zip(prompts, ids, given):   # n choices each, in order, as OpenAI does
        more, p, g = _complete_one(state, body, prompt, prompt_ids, done, fault == "wrong_length")
        choices += [c | {"index": len(choices) + i} for i, c in enumerate(more)]
        n_prompt, n_gen = n_prompt + p, n_gen + g
    return _envelope("cmpl", "text_completion", body.model or state.model_name, choices,
                     n_prompt, n_gen)


def _complete_one(state: ServerState, body: CompletionBody, prompt: str, ids: list[int],
                  given: Completion | None, short: bool) -> tuple[list[dict], int, int]:
    tok = state.backend.tokenizer
    k = max(body.logprobs or 0, body.prompt_logprobs or 0)
    scores = state.prefix.run(ids, k)[0] \
        if body.prompt_logprobs is not None or (body.echo and body.logprobs is not None) else None
    if _one_greedy_token(body):
        c = given or next_token(state, ids, body.logprobs or 0)
        completions, n_prompt, n_gen = [c] * body.n, len(ids), len(c.token_ids or ()) * body.n
    elif body.max_tokens > 0:
        completions, n_prompt, n_gen = _generate(state, body, body.max_tokens, body.logprobs, prompt=prompt)
    else:
        completions, n_prompt, n_gen = [Completion("", (), "length")] * body.n, len(ids), 0
    choices = []
    for c in completions:
        choice: dict[str, Any] = {"finish_reason": c.finish_reason, "logprobs": None,
                                  "text": (prompt if body.echo else "") + _maybe_cut(c.text, short)}
        if body.logprobs is not None:
            lp = _legacy_logprobs(tok, c, body.logprobs, ids, scores if body.echo else None)
            choice["logprobs"] = {key: v[:-1] for key, v in lp.items()} if short else lp
        if body.prompt_logprobs is not None:
            entries = _vllm_prompt_logprobs(tok, ids, body.prompt_logprobs, scores)
            choice["prompt_logprobs"] = entries[:-1] if short else entries
        if body.return_token_ids:
            generated = list(c.token_ids or ())
            choice["prompt_token_ids"] = ids
            choice["token_ids"] = generated[:_n_within([_piece(tok, t) for t in generated], c.text)]
        choices.append(choice)
    return choices, n_prompt, n_gen


def _chat(state: ServerState, body: ChatBody, fault: str) -> dict:
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true.")
    _check_k(state, body.top_logprobs)
    messages = tuple(Message("system" if m.role == "developer" else m.role,
                             m.content if isinstance(m.content, str) else "".join(p.text for p in m.content))
                     for m in body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens or 128
    k = (body.top_logprobs or 0) if body.logprobs else None
    completions, n_prompt, n_gen = _generate(state, body, max_tokens, k, messages=messages)

    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    choices = []
    for i, c in enumerate(completions):
        logprobs = None
        if k is not None:
            content = [{**item(t.token, t.logprob), "top_logprobs": [item(*a) for a in t.top[:k]]}
                       for t in _within(c.logprobs or (), c.text)]
            logprobs = {"content": content[:-1] if fault == "wrong_length" else content}
        text = _maybe_cut(c.text, fault == "wrong_length")
        choices.append({"index": i, "message": {"role": "assistant", "content": text},
                        "finish_reason": c.finish_reason, "logprobs": logprobs})
    return _envelope("chatcmpl", "chat.completion", body.model or state.model_name, choices,
                     n_prompt, n_gen)


def _envelope(prefix: str, kind: str, model: str, choices: list, n_prompt: int, n_gen: int) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                      "total_tokens": n_prompt + n_gen}}


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="neuronlens-serve")

    @app.middleware("http")
    async def count_and_inject(request: Request, call_next):
        state.requests[request.url.path] += 1
        fault = state.next_fault() if request.method == "POST" else "none"
        request.state.fault = fault
        if fault == "429":
            return error_response(429, "Rate limit reached (injected fault).", "rate_limit_exceeded",
                                  "requests", {"Retry-After": f"{state.retry_after:g}"})
        if fault == "500":
            return error_response(500, "Internal server error (injected fault).", None, "server_error")
        if fault == "slow":
            await asyncio.sleep(state.slow_seconds)
        response = await call_next(request)
        if fault == "truncated":
            body = b"".join([chunk async for chunk in response.body_iterator])
            return Response(body[:len(body) // 2], response.status_code, media_type="application/json")
        return response

    @app.exception_handler(ApiError)
    @app.exception_handler(UserError)
    @app.exception_handler(HTTPException)
    async def known_error(_: Request, e: Exception) -> JSONResponse:
        if isinstance(e, ApiError):
            return error_response(e.status, e.message, e.code, e.type)
        if isinstance(e, HTTPException):
            return error_response(e.status_code, str(e.detail))
        return error_response(400, str(e))   # a UserError (e.g. no chat template)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}".lstrip(": "))

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"{type(e).__name__}: {e}", None, "server_error")

    def run(body: _Body, answer) -> dict:
        if state.strict_model and body.model not in (None, state.model_name):
            raise ApiError(404, f"The model `{body.model}` does not exist.", "model_not_found")
        if body.stream:
            raise ApiError(400, "stream=true is not supported by neuronlens-serve.")
        with state.lock:
            return answer()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": 0, "owned_by": "neuronlens",
             "root": _root(state.backend), "parent": None,
             "max_model_len": state.backend.capabilities.context_length}]}

    @app.post("/v1/completions")
    def completions(body: CompletionBody, request: Request) -> dict:
        return run(body, lambda: _complete(state, body, request.state.fault))

    @app.post("/v1/chat/completions")
    def chat(body: ChatBody, request: Request) -> dict:
        return run(body, lambda: _chat(state, body, request.state.fault))

    @app.get("/stats")
    def stats() -> dict:
        return {"requests": dict(state.requests), "faults": dict(state.fault_counts)}

    return app


def _root(backend: LocalBackend) -> str:
    """What the model was loaded from, as vLLM's ``root``: the local directory where there is
    one (an embedded model's de-quantised copy, a path made absolute), else the hub name."""
    loaded = backend.model.config.name_or_path or backend.model_name
    path = Path(loaded).expanduser()
    return str(path.resolve()) if path.is_dir() else loaded


def make_state(model: str, device: str = "auto", dtype: str = "auto", strict_model: bool = True,
               faults: Any = (), retry_after: float = 0.1, slow_seconds: float = 5.0,
               max_logprobs: int | None = 20) -> ServerState:
    """Validate the options and load the model (once)."""
    names = tuple(str(f) for f in (faults or ()))   # Hydra reads `429` as an int
    unknown = [f for f in names if f not in FAULTS]
    if unknown:
        raise UserError(f"Unknown fault {unknown[0]!r}; choose from {', '.join(FAULTS)}.")
    backend = LocalBackend(model=model, device=device, dtype=dtype)
    backend.load()
    return ServerState(backend, model, strict_model, names, retry_after, slow_seconds, max_logprobs)


# ---- running it -------------------------------------------------------------------------------
@dataclass
class ServerHandle:
    """A server running in a background thread. ``requests``: counts by endpoint path (the
    readiness probe is one ``/v1/models``); ``faults``: counts by fault name (POST requests)."""

    server: uvicorn.Server
    thread: threading.Thread
    state: ServerState
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        """The served model name, the one requests must give."""
        return self.state.model_name

    @property
    def requests(self) -> Counter:
        return self.state.requests

    @property
    def faults(self) -> Counter:
        return self.state.fault_counts

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``: connections queue from here on, so the server is
    announced only once this has succeeded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"Cannot listen on {host}:{port} ({e.strerror}); is another server there? "
                        "Choose another with port=...") from e
    return sock


def start_server(model: str, port: int = 0, *, device: str = "auto", dtype: str = "auto",
                 strict_model: bool = True, faults: Any = (), retry_after: float = 0.1,
                 slow_seconds: float = 5.0, max_logprobs: int | None = 20,
                 timeout: float = 30.0) -> ServerHandle:
    """Serve ``model`` on 127.0.0.1:``port`` (0: a free port) in a background thread; returns once
    ``/v1/models`` answers. Requests must name ``model`` exactly (``handle.model``) unless
    ``strict_model=False``; ``max_logprobs=None`` lifts the limit of 20 logprobs per token."""
    state = make_state(model, device, dtype, strict_model, faults, retry_after, slow_seconds,
                       max_logprobs)
    sock = bind("127.0.0.1", port)
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"neuronlens-serve:{sock.getsockname()[1]}")
    thread.start()
    handle = ServerHandle(server, thread, state, sock.getsockname()[1])
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{handle.base_url}/models", timeout=1.0).status_code == 200:
                return handle
        except httpx.TransportError:
            pass
        if not thread.is_alive() or time.monotonic() > deadline:
            handle.stop()
            raise RuntimeError(f"neuronlens-serve did not start on port {handle.port}.")
        time.sleep(0.05)


def serve(cfg: DictConfig) -> None:
    """Serve until stopped (Ctrl-C), with the options of ``neuronlens/conf/serve.yaml``."""
    sock = bind(str(cfg.host), int(cfg.port))   # first: a taken port fails before the model loads
    state = make_state(str(cfg.model), cfg.device, cfg.dtype, cfg.strict_model, cfg.faults,
                       cfg.retry_after, cfg.slow_seconds, cfg.max_logprobs)
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="info"))
    print(f"neuronlens-serve: {cfg.model} at http://{cfg.host}:{sock.getsockname()[1]}/v1", flush=True)
    server.run(sockets=[sock])


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="serve")
def _app(cfg: DictConfig) -> None:
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


def main() -> None:
    from neuronlens.help import help_text, wants_help

    if wants_help(sys.argv[1:]):
        print(help_text("neuronlens-serve", "serve", ABOUT, EXAMPLES, ()))
        return
    _app()


if __name__ == "__main__":
    main()
