"""The API's shapes: the request bodies of ``/v1/completions`` and ``/v1/chat/completions``, the
OpenAI error body (``ApiError``, ``error_response``) and the envelope every answer comes in."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


# ---- request bodies ---------------------------------------------------------------------------
class RequestBody(BaseModel):
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


class CompletionBody(RequestBody):
    prompt: str | list[str] | list[int] | list[list[int]]   # text, or token ids as vLLM takes them
    logit_bias: dict[str, float] | None = None   # token id -> bias; greedy completions only
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0)   # vLLM's extension
    return_token_ids: bool | None = None             # vLLM's: prompt_token_ids and token_ids
    logprob_token_ids: list[int] | None = None       # vLLM's: these ids' logprobs in place of the top-k


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatBody(RequestBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


# ---- answers ----------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_


def error_response(status: int, message: str, code: str | None = None,
                   type_: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def envelope(prefix: str, kind: str, model: str, choices: list, n_prompt: int, n_gen: int) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                      "total_tokens": n_prompt + n_gen}}
