"""Fault injection: successive POST requests misbehave in a cycle (429, 500, slow, truncated JSON,
answers one entry short) so that clients' retry and validation paths meet a real server."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from neuronlens.errors import UserError
from neuronlens.serve.schemas import error_response

FAULTS = ("none", "429", "500", "slow", "truncated", "wrong_length")


def fault_names(faults: Any) -> tuple[str, ...]:
    """The faults as names, each one of ``FAULTS``."""
    names = tuple(str(f) for f in (faults or ()))   # Hydra reads `429` as an int
    unknown = [f for f in names if f not in FAULTS]
    if unknown:
        raise UserError(f"Unknown fault {unknown[0]!r}; choose from {', '.join(FAULTS)}.")
    return names


def next_fault(faults: tuple[str, ...], counts: Counter) -> str:
    """The fault of the next POST request (the cycle of ``faults``), counted in ``counts``."""
    n = sum(counts.values())
    fault = faults[n % len(faults)] if faults else "none"
    counts[fault] += 1
    return fault


async def inject(fault: str, request: Request, call_next: Callable[[Request], Awaitable[Response]],
                 retry_after: float, slow_seconds: float) -> Response:
    """The answer to ``request`` with ``fault`` applied: a 429 or 500 in its place, the answer
    after ``slow_seconds``, or the answer cut in half (``truncated``)."""
    if fault == "429":
        return error_response(429, "Rate limit reached (injected fault).", "rate_limit_exceeded",
                              "requests", {"Retry-After": f"{retry_after:g}"})
    if fault == "500":
        return error_response(500, "Internal server error (injected fault).", None, "server_error")
    if fault == "slow":
        await asyncio.sleep(slow_seconds)
    response = await call_next(request)
    if fault == "truncated":
        body = b"".join([chunk async for chunk in response.body_iterator])
        return Response(body[:len(body) // 2], response.status_code, media_type="application/json")
    return response


def maybe_cut(text: str, cut: bool) -> str:
    """``text`` without its last line when ``cut`` (the `wrong_length` fault)."""
    return text[:text.rstrip("\n").rfind("\n") + 1] if cut else text
