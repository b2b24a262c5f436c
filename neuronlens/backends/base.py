"""The backend interface: one frozen request type per capability, capabilities declared as data.

A backend only translates a typed request into a model call and parses the answer. Retries,
caching, concurrency and accounting live in the policy layer (`neuronlens.backends.policy`);
batching and progress in the engine (`neuronlens.scorers.simulation`, `neuronlens.explainers.llm`,
`neuronlens.pipeline`). Every failure carries a ``kind`` (a short name such as ``timeout`` or
``misaligned``) that summaries count it by.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Sequence

from neuronlens.errors import UserError
from neuronlens.secrets import redact


@dataclass(frozen=True)
class Capabilities:
    chat: bool = False              # generate() accepts messages
    completion: bool = False        # generate() accepts a raw text prompt
    output_logprobs: bool = False   # generate() can return top-k logprobs per generated token
    prompt_logprobs: bool = False   # prompt_logprobs() is implemented
    context_length: int = 4096      # prompt + completion tokens the model accepts


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class GenerateRequest:
    """Chat (``messages``) or text completion (``prompt``); exactly one of the two."""

    messages: tuple[Message, ...] = ()
    prompt: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    n: int = 1
    top_logprobs: int = 0           # 0: no logprobs; k: the top-k alternatives of each token
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if bool(self.messages) == (self.prompt is not None):
            raise ValueError("A GenerateRequest needs either messages (chat) or prompt (text).")


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()   # (token, logprob), most likely first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens)


@dataclass(frozen=True)
class Completion:
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str = "stop"     # "stop" | "length"
    token_ids: tuple[int, ...] | None = None   # the generated tokens, where the backend knows them


@dataclass(frozen=True)
class Generation:
    completions: tuple[Completion, ...]
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class PromptLogprobRequest:
    """Score a prompt: at each character offset in ``positions`` the prompt holds a placeholder;
    return the model's distribution over ``candidates`` (strings) in place of that placeholder,
    given everything before it."""

    prompt: str
    positions: tuple[int, ...]
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class TokenDistributions:
    """``probs[i][k]``: probability of candidate k at position i, renormalised over the candidates.
    ``mass[i]``: the probability the model put on any candidate before renormalising."""

    probs: tuple[tuple[float, ...], ...]
    mass: tuple[float, ...]
    usage: Usage = field(default_factory=Usage)
    error: str | None = None   # set when this prompt could not be scored (after any retries)
    kind: str | None = None    # the error's kind (see `failure_kind`)
    bound: tuple[float, ...] = ()   # per position, how far skipped follow-ups can move the
                                    # expected value (remote backends' opt-in; empty: exact)


class BackendError(UserError):
    """A fatal backend error a user can act on (bad key, unknown model, bad request); its message
    is one clear sentence. Never retried."""


class Unscorable(RuntimeError):
    """One prompt cannot be scored (e.g. no token covers a placeholder, or the server's tokens do
    not align with the prompt): that excerpt fails, the run goes on, and retrying would not help."""

    def __init__(self, message: str, kind: str = "unscorable"):
        super().__init__(redact(str(message)))
        self.kind = kind
        self.usage: Usage | None = None   # the tokens of the answer that could not be scored


class TransientError(RuntimeError):
    """A failure worth retrying: rate limit (429), server error (5xx), timeout, lost connection,
    or an answer that could not be parsed. ``retry_after``: seconds the server asked to wait.
    ``kind``: ``timeout``, ``rate_limited``, ``overloaded`` (503), ``server_error``,
    ``unreachable``, ``unparseable`` or ``transient``; the first three mean the server is busy."""

    BUSY = ("timeout", "rate_limited", "overloaded")

    def __init__(self, message: str, retry_after: float | None = None, kind: str = "transient"):
        super().__init__(redact(str(message)))
        self.retry_after, self.kind = retry_after, kind
        self.usage: Usage | None = None   # the tokens of an answer that came but was unusable


def failure_kind(error: BaseException) -> str:
    """The short name a failure is counted under: its ``kind``, else its type in snake case."""
    kind = getattr(error, "kind", None)
    if kind:
        return str(kind)
    name = type(error).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class Backend(ABC):
    """A language model the explainer or the simulator talks to."""

    capabilities: Capabilities = Capabilities()
    remote: bool = False   # remote backends get the engine's cache, retries and cost accounting

    def load(self) -> None:
        """Load weights or open connections; constructors only store validated config."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def identity(self) -> dict:
        """Everything about this backend that changes its outputs (model, revision, endpoint) and
        nothing that doesn't (timeouts, keys): part of every response-cache key."""
        return {"backend": type(self).__name__}

    @abstractmethod
    def generate(self, request: GenerateRequest) -> Generation: ...

    def generate_usable(self, request: GenerateRequest,
                        usable: Callable[[Generation], bool]) -> Generation:
        """`generate`, for a caller that can tell whether an answer is usable (it parses): the
        policy layer caches only usable answers. A plain backend just generates."""
        return self.generate(request)

    def prompt_logprobs(self, requests: Sequence[PromptLogprobRequest]) -> list[TokenDistributions]:
        raise BackendError(f"The {self.name} backend cannot score prompts (no prompt logprobs); "
                           "choose a simulator strategy that uses output logprobs.")

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``; backends without a tokenizer estimate 4 characters a token."""
        return max(1, len(text) // 4)


def retry_after(headers: Any) -> float | None:
    """Seconds a server asked to wait, from its ``retry-after-ms`` or ``Retry-After`` header
    (seconds or an HTTP date), in any letter case; None when it asked nothing readable."""
    if not headers:
        return None
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        if "retry-after-ms" in lower:
            return max(0.0, float(lower["retry-after-ms"]) / 1000)
        if "retry-after" in lower:
            value = lower["retry-after"]
            try:
                return max(0.0, float(value))
            except ValueError:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
    return None
