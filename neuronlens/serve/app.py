"""The FastAPI app: the routes (``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /stats``), request counts and injected faults around every
request, OpenAI-shaped error bodies for every failure, and one request at a time on the model."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from neuronlens.backends.local import LocalBackend
from neuronlens.errors import UserError
from neuronlens.serve.engine import ServerState
from neuronlens.serve.faults import inject
from neuronlens.serve.handlers import complete, complete_chat
from neuronlens.serve.schemas import (ApiError, ChatBody, CompletionBody, RequestBody,
                                      error_response)


def authorised(header: str, key: str) -> bool:
    """Whether an Authorization header carries ``key`` as its bearer token, compared in constant
    time (the time taken says nothing about how much of a guess was right)."""
    return hmac.compare_digest(header.encode(), f"Bearer {key}".encode())


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="neuronlens-serve")

    @app.middleware("http")
    async def count_and_inject(request: Request, call_next):
        state.requests[request.url.path] += 1
        if state.api_key and not authorised(request.headers.get("authorization", ""), state.api_key):
            # as OpenAI and vLLM answer, and nothing of what was sent is echoed
            return error_response(401, "Missing or incorrect API key: send it as the bearer token "
                                       "(Authorization: Bearer ...).", "invalid_api_key")
        fault = state.next_fault() if request.method == "POST" else "none"
        request.state.fault = fault
        return await inject(fault, request, call_next, state.retry_after, state.slow_seconds)

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

    def run(body: RequestBody, answer) -> dict:
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
        return run(body, lambda: complete(state, body, request.state.fault))

    @app.post("/v1/chat/completions")
    def chat(body: ChatBody, request: Request) -> dict:
        return run(body, lambda: complete_chat(state, body, request.state.fault))

    @app.get("/stats")
    def stats() -> dict:
        return {"requests": dict(state.requests), "faults": dict(state.fault_counts),
                "tokens_computed": state.tokens_computed}

    return app


def _root(backend: LocalBackend) -> str:
    """What the model was loaded from, as vLLM's ``root``: the local directory where there is
    one (an embedded model's de-quantised copy, a path made absolute), else the hub name."""
    loaded = backend.model.config.name_or_path or backend.model_name
    path = Path(loaded).expanduser()
    return str(path.resolve()) if path.is_dir() else loaded
