"""`neuronlens-serve`: an OpenAI-compatible HTTP server over the local backend.

The model is loaded once at start-up and requests are answered one at a time (a lock around the
model), so many jobs can share it. Endpoints: ``GET /v1/models``; ``POST /v1/completions`` with
the legacy ``logprobs``/``echo`` prompt scoring and vLLM's ``prompt_logprobs``;
``POST /v1/chat/completions`` with ``logprobs``/``top_logprobs``; ``GET /stats`` (request counts).
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

from neuronlens.backends.base import Completion, GenerateRequest, Message, TokenLogprob
from neuronlens.backends.local import LocalBackend
from neuronlens.cli import CONF_DIR, fail_cleanly
from neuronlens.errors import UserError

FAULTS = ("none", "429", "500", "slow", "truncated", "wrong_length")


# ---- request bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (top_p, user, ...)

    model: str
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


@torch.no_grad()
def score_prompt(model: Any, ids: list[int], k: int) -> PromptScores:
    """One forward pass over ``ids``; log-softmax in float32 at every position."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    actual = logp.gather(1, torch.tensor(ids[1:], device=device)[:, None])
    rank = (logp > actual).sum(dim=1) + 1
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    pairs = [list(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)]
    return PromptScores(actual[:, 0].tolist(), rank.tolist(), pairs)


# ---- the server -------------------------------------------------------------------------------
@dataclass
class ServerState:
    backend: LocalBackend
    model_name: str
    strict_model: bool = False
    faults: tuple[str, ...] = ()
    retry_after: float = 0.1
    slow_seconds: float = 5.0
    max_logprobs: int | None = None    # like vLLM's --max-logprobs; None: any k
    requests: Counter = field(default_factory=Counter)       # by endpoint path
    fault_counts: Counter = field(default_factory=Counter)   # by fault name, POST requests only
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_fault(self) -> str:
        n = sum(self.fault_counts.values())
        fault = self.faults[n % len(self.faults)] if self.faults else "none"
        self.fault_counts[fault] += 1
        return fault


def _maybe_cut(text: str, cut: bool) -> str:
    """``text`` without its last line when ``cut`` (the `wrong_length` fault)."""
    return text[:text.rstrip("\n").rfind("\n") + 1] if cut else text


def _within(logprobs: tuple[TokenLogprob, ...], text: str) -> list[TokenLogprob]:
    """The generated tokens that start inside ``text`` (a stop string may have cut it short)."""
    starts = [sum(len(t.token) for t in logprobs[:i]) for i in range(len(logprobs))]
    cut = sum(len(t.token) for t in logprobs) > len(text)
    return [t for t, at in zip(logprobs, starts) if not cut or at < len(text)]


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


def _legacy_logprobs(tok: Any, c: Completion, k: int, prompt: str, ids: list[int],
                     offsets: list, scores: PromptScores | None) -> dict[str, list]:
    """The legacy ``logprobs`` object: prompt tokens first when echoed (``scores`` given)."""
    lp: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if scores is not None:
        lp["tokens"] = [_piece(tok, t) for t in ids]
        lp["token_logprobs"] = [None] + scores.logprob
        lp["top_logprobs"] = [None] + [_top_dict((_piece(tok, t), v) for t, v in top[:k])
                                       for top in scores.top]
        lp["text_offset"] = [start for start, _ in offsets]
    at = len(prompt) if scores is not None else 0
    for t in _within(c.logprobs or (), c.text):
        lp["tokens"].append(t.token)
        lp["token_logprobs"].append(t.logprob)
        lp["top_logprobs"].append(_top_dict(t.top[:k]))
        lp["text_offset"].append(at)
        at += len(t.token)
    return lp


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


def _complete(state: ServerState, body: CompletionBody, fault: str) -> dict:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or not all(prompts):
        raise ApiError(400, "prompt must be a non-empty string or a list of non-empty strings.")
    _check_k(state, body.logprobs, body.prompt_logprobs)
    choices, n_prompt, n_gen = [], 0, 0
    for prompt in prompts:  # one block of n choices per prompt, indexed in order, as OpenAI does
        more, p, g = _complete_one(state, body, prompt, fault == "wrong_length")
        choices += [c | {"index": len(choices) + i} for i, c in enumerate(more)]
        n_prompt, n_gen = n_prompt + p, n_gen + g
    return _envelope("cmpl", "text_completion", body.model, choices, n_prompt, n_gen)


def _complete_one(state: ServerState, body: CompletionBody, prompt: str,
                  short: bool) -> tuple[list[dict], int, int]:
    tok = state.backend.tokenizer
    enc = tok(prompt, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    echo_scores = body.echo and body.logprobs is not None
    scores = score_prompt(state.backend.model, ids, max(body.logprobs or 0, body.prompt_logprobs or 0)) \
        if body.prompt_logprobs is not None or echo_scores else None
    if body.max_tokens > 0:
        completions, n_prompt, n_gen = _generate(state, body, body.max_tokens, body.logprobs, prompt=prompt)
    else:
        completions, n_prompt, n_gen = [Completion("", (), "length")] * body.n, len(ids), 0
    choices = []
    for c in completions:
        choice: dict[str, Any] = {"finish_reason": c.finish_reason, "logprobs": None,
                                  "text": (prompt if body.echo else "") + _maybe_cut(c.text, short)}
        if body.logprobs is not None:
            lp = _legacy_logprobs(tok, c, body.logprobs, prompt, ids, offsets, scores if body.echo else None)
            choice["logprobs"] = {key: v[:-1] for key, v in lp.items()} if short else lp
        if body.prompt_logprobs is not None:
            entries = _vllm_prompt_logprobs(tok, ids, body.prompt_logprobs, scores)
            choice["prompt_logprobs"] = entries[:-1] if short else entries
            choice["prompt_token_ids"] = ids
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
    return _envelope("chatcmpl", "chat.completion", body.model, choices, n_prompt, n_gen)


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
        if state.strict_model and body.model != state.model_name:
            raise ApiError(404, f"The model `{body.model}` does not exist.", "model_not_found")
        if body.stream:
            raise ApiError(400, "stream=true is not supported by neuronlens-serve.")
        with state.lock:
            return answer()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model",
                                            "created": 0, "owned_by": "neuronlens"}]}

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


def make_state(model: str, device: str = "auto", dtype: str = "auto", strict_model: bool = False,
               faults: Any = (), retry_after: float = 0.1, slow_seconds: float = 5.0,
               max_logprobs: int | None = None) -> ServerState:
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


def start_server(model: str, port: int = 0, *, device: str = "auto", dtype: str = "auto",
                 strict_model: bool = False, faults: Any = (), retry_after: float = 0.1,
                 slow_seconds: float = 5.0, max_logprobs: int | None = None,
                 timeout: float = 30.0) -> ServerHandle:
    """Serve ``model`` on 127.0.0.1:``port`` (0: a free port) in a background thread; returns once
    ``/v1/models`` answers."""
    state = make_state(model, device, dtype, strict_model, faults, retry_after, slow_seconds,
                       max_logprobs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
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
    """Serve until stopped (Ctrl-C), with the options of ``conf/serve.yaml``."""
    state = make_state(str(cfg.model), cfg.device, cfg.dtype, cfg.strict_model, cfg.faults,
                       cfg.retry_after, cfg.slow_seconds, cfg.max_logprobs)
    print(f"neuronlens-serve: {cfg.model} at http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(build_app(state), host=cfg.host, port=int(cfg.port), log_level="info")


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="serve")
def _app(cfg: DictConfig) -> None:
    fail_cleanly(lambda: serve(cfg))


def main() -> None:
    if not (CONF_DIR / "serve.yaml").is_file():
        sys.exit(f"neuronlens-serve: error: no serve.yaml in {CONF_DIR}; install with "
                 "`pip install -e .` from a checkout of the repository.")
    _app()


if __name__ == "__main__":
    main()
