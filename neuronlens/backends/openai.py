"""The OpenAI backend: the OpenAI API, or any OpenAI-compatible server at ``base_url``.

Chat (``messages``) goes to ``/chat/completions`` with ``logprobs``/``top_logprobs``; text
(``prompt``) to the legacy ``/completions`` with ``logprobs=k``. Answers are parsed by pure
functions (``parse_chat``, ``parse_completion``) into the one logprob type of ``base.py``.
Prompt scoring (``prompt_scoring="echo"``) uses the legacy ``echo=True, max_tokens=0,
logprobs=k`` where a server still offers it (current OpenAI models refuse it; vLLM and
neuronlens-serve do); ``echo_tokens`` places the echoed tokens in the prompt, and
``remote_scoring.py`` turns their top-k into candidate distributions. OpenAI's own legacy
completions take at most ``logprobs=5``, so k is clamped to 5 there.

The key comes only from the environment (``OPENAI_API_KEY``). Retries belong to the engine: the
client never retries (``max_retries=0``) and ``classify_error`` turns every failure into a
``TransientError`` (retry) or a ``BackendError`` (one sentence a user can act on).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from neuronlens.backends.base import (
    retry_after,
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
from neuronlens.backends.remote_scoring import PromptToken, bound_identity, check_bound, score_prompt
from neuronlens.errors import UserError

OPENAI_URL = "https://api.openai.com/v1"
OPENAI_LEGACY_MAX_LOGPROBS = 5   # OpenAI's /completions refuses logprobs > 5
MISSING_KEY = ("OPENAI_API_KEY is not set; export it in the environment "
               "(keys never go in config files).")


# ---- parsing (pure) ---------------------------------------------------------------------------
def _top(pairs: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(((str(t), float(lp)) for t, lp in pairs), key=lambda p: -p[1]))


def parse_usage(data: dict) -> Usage:
    usage = data.get("usage") or {}
    return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def parse_chat(data: dict) -> Generation:
    """A ``/chat/completions`` answer (JSON) as a Generation."""
    completions = []
    for choice in sorted(data["choices"], key=lambda c: c.get("index") or 0):
        logprobs = None
        if choice.get("logprobs") and choice["logprobs"].get("content") is not None:
            logprobs = tuple(
                TokenLogprob(item["token"], float(item["logprob"]),
                             _top((t["token"], t["logprob"]) for t in item.get("top_logprobs") or ()))
                for item in choice["logprobs"]["content"])
        text = choice["message"].get("content") or ""
        completions.append(Completion(text, logprobs, _finish(choice)))
    return Generation(tuple(completions), parse_usage(data))


def parse_completion(data: dict) -> Generation:
    """A legacy ``/completions`` answer (JSON) as a Generation."""
    completions = []
    for choice in sorted(data["choices"], key=lambda c: c["index"]):
        logprobs, lp = None, choice.get("logprobs")
        if lp:
            tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
            logprobs = tuple(TokenLogprob(tok, float(v), _top((top or {}).items()))
                             for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], tops,
                                                    strict=True))
        completions.append(Completion(choice["text"], logprobs, _finish(choice)))
    return Generation(tuple(completions), parse_usage(data))


def _finish(choice: dict) -> str:
    return "length" if choice.get("finish_reason") in ("length", "max_tokens") else "stop"


def echo_tokens(data: dict, prompt: str) -> list[PromptToken]:
    """The prompt's tokens from a legacy ``echo=True`` answer: where each starts in the prompt,
    and the top-k at it with the actual token added if the top-k left it out.

    Start offsets are rebuilt from the tokens' texts; ``text_offset`` is not trusted, since
    servers disagree on it (vLLM's is a running sum of token lengths that counts a BOS's text).
    A first token that the prompt does not start with is a BOS (``<s>``, ``<|begin_of_text|>``)
    and is dropped. ``bytes:\\xNN`` tokens (OpenAI's form of part of a character) are decoded
    together; a run of tokens holding U+FFFD (parts of characters decoded one at a time, as vLLM
    does) ends where the tokens after it go on rebuilding the prompt, if exactly one place fits.
    Tokens after the prompt's end (generated ones) are left out.

    An answer that ends before the prompt does is a ``TransientError`` (damaged; worth a
    retry); one whose tokens do not rebuild the prompt, or rebuild it more than one way, is
    ``Unscorable``."""
    lp = data["choices"][0]["logprobs"]
    rows = list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True))
    if rows and not _partial(rows[0][0]) and not prompt.startswith(rows[0][0]):
        rows = rows[1:]
    tokens = []
    for (tok, logprob, top), start in zip(rows, _starts([r[0] for r in rows], prompt)):
        top = dict(top or {})
        if logprob is not None:
            top.setdefault(tok, float(logprob))
        tokens.append(PromptToken(start, top))
    return tokens


def _partial(text: str) -> bool:
    """Part of a character: OpenAI's ``bytes:\\xNN`` or a decoded U+FFFD."""
    return text.startswith("bytes:") or "\ufffd" in text


def _starts(texts: list[str], prompt: str) -> list[int]:
    """Start offsets in ``prompt`` of the tokens ``texts`` that make it up, in order."""
    starts: list[int] = []
    pos, i, pending = 0, 0, codecs.getincrementaldecoder("utf-8")()
    while i < len(texts) and (pos < len(prompt) or pending.getstate()[0]):
        text, begin = texts[i], pos
        if text.startswith("bytes:"):
            try:
                text = pending.decode(bytes.fromhex(text[6:].replace("\\x", "")))
            except ValueError as e:   # not hex, or not UTF-8 once joined
                raise Unscorable(f"Echoed token {texts[i]!r} is not valid bytes: {e}.",
                                 kind="misaligned") from e
        elif pending.getstate()[0]:
            raise Unscorable(f"Echoed tokens leave a character unfinished at offset {pos}.",
                             kind="misaligned")
        elif "\ufffd" in text:
            end = next((j for j in range(i, len(texts)) if "\ufffd" not in texts[j]), len(texts))
            pos = _resume(texts, i, end, prompt, pos)
            starts += [begin] * (end - i)
            i = end
            continue
        if not prompt.startswith(text, pos):
            raise Unscorable(f"Echoed token {texts[i]!r} does not match the prompt at offset "
                             f"{pos}.", kind="misaligned")
        starts.append(begin)
        pos, i = pos + len(text), i + 1
    if pos < len(prompt) or pending.getstate()[0]:
        raise TransientError(f"Echoed prompt tokens are misaligned: they end at {pos}, the "
                             f"prompt at {len(prompt)}.", kind="unparseable")
    return starts


def _resume(texts: list[str], i: int, end: int, prompt: str, pos: int) -> int:
    """Where the U+FFFD tokens ``texts[i:end]``, starting at ``pos``, end in the prompt: each
    U+FFFD stands for one or more non-ASCII characters, and the whole tokens after them must
    match from there (up to the prompt's end or the next partial token)."""
    run = "".join(texts[i:end])
    pattern = re.compile("".join("[^\\x00-\\x7f]+" if part.startswith("\ufffd") else re.escape(part)
                                 for part in re.split("(\ufffd+)", run) if part))

    def rest_fits(at: int) -> bool:
        for text in texts[end:]:
            if at == len(prompt) or _partial(text):
                return True
            if not prompt.startswith(text, at):
                return False
            at += len(text)
        return at == len(prompt)

    fits = [q for q in range(pos + 1, min(pos + len(run), len(prompt)) + 1)
            if pattern.fullmatch(prompt, pos, q) and rest_fits(q)]
    if len(fits) != 1:
        raise Unscorable(f"Echoed tokens with U+FFFD at offset {pos} fit the prompt "
                         f"{'in more than one way' if fits else 'nowhere'}.", kind="misaligned")
    return fits[0]


def first_token_tops(data: dict, n: int) -> list[dict[str, float]]:
    """The top-k of the first generated token of each of ``n`` prompts of one completions call."""
    return [steps[0][1] for steps in generated_tops(data, n)]


def generated_tops(data: dict, n: int) -> list[list[tuple[str, dict[str, float]]]]:
    """Per prompt of one completions call with ``n`` prompts, each generated token with the
    top-k at its step (the token itself in it too: the legacy format lists it apart)."""
    choices = sorted(data["choices"], key=lambda c: c["index"])
    if len(choices) != n:
        raise ValueError(f"expected {n} choices, got {len(choices)}")
    out = []
    for choice in choices:
        lp, steps = choice["logprobs"], []
        for i in range(len(lp["tokens"])):
            top = dict(lp["top_logprobs"][i])   # IndexError/TypeError: unparseable
            top.setdefault(lp["tokens"][i], float(lp["token_logprobs"][i]))
            steps.append((lp["tokens"][i], top))
        if not steps:
            raise ValueError("a choice without generated tokens")
        out.append(steps)
    return out


# ---- errors -----------------------------------------------------------------------------------
def _server_message(body: Any, fallback: str) -> str:
    if isinstance(body, dict):
        body = body.get("message") or body.get("detail") or body.get("error") or body
    return str(body if body else fallback).strip().rstrip(".")[:300]


def classify_error(error: Exception, model: str, base_url: str,
                   key_env: str = "OPENAI_API_KEY") -> Exception:
    """The exception to raise for ``error``: TransientError (retry) or BackendError (fatal).
    Unknown exception types are returned unchanged (they are bugs, not server trouble)."""
    import openai

    where = f"The server at {base_url}"
    if isinstance(error, (TransientError, BackendError)):
        return error
    if isinstance(error, openai.APITimeoutError):
        return TransientError(f"{where} timed out (model '{model}').", kind="timeout")
    if isinstance(error, openai.APIConnectionError):
        return TransientError(f"{where} could not be reached (model '{model}'): {error}",
                              kind="unreachable")
    if isinstance(error, openai.APIStatusError):
        status, msg = error.status_code, _server_message(error.body, error.message)
        if status == 429:
            return TransientError(f"{where} is rate-limiting requests (429): {msg}.",
                                  retry_after(error.response.headers), kind="rate_limited")
        if status >= 500 or status in (408, 409):
            return TransientError(f"{where} failed ({status}): {msg}.",
                                  retry_after(error.response.headers),
                                  kind="overloaded" if status == 503 else "server_error")
        if status == 401:
            return BackendError(f"{where} rejected the API key (401): {msg}; check {key_env}.")
        if status == 403:
            return BackendError(f"{where} refused access to model '{model}' (403): {msg}; "
                                "check the key's permissions.")
        if status == 404:
            return BackendError(f"{where} does not know model '{model}' (404): {msg}; check "
                                "explainer.model / simulator.model and base_url.")
        return BackendError(f"{where} refused the request for model '{model}' ({status}): {msg}.")
    if isinstance(error, (openai.APIResponseValidationError, json.JSONDecodeError,
                          KeyError, IndexError, TypeError, ValueError)):
        return TransientError(f"{where} sent an answer that could not be parsed "
                              f"({type(error).__name__}: {str(error)[:200]}).", kind="unparseable")
    return error


# ---- the backend ------------------------------------------------------------------------------
KEEPALIVE_S = 1.0   # below the idle timeout servers close keep-alive connections at (uvicorn: 5 s)


def short_keepalive_client(openai: Any) -> Any:
    """The openai package's own HTTP client, reusing a connection only while it has been idle
    under ``KEEPALIVE_S``. A server closes idle keep-alive connections after its own timeout
    (vLLM's uvicorn: 5 s, the client library's default too), and a request sent on a connection
    it is closing at that moment fails with a connection error that the policy must retry."""
    import importlib

    base = next(c for c in openai.DefaultHttpxClient.__mro__ if not c.__module__.startswith("openai"))
    http = importlib.import_module(base.__module__.partition(".")[0])   # httpx, or httpx2 (openai 3)
    return openai.DefaultHttpxClient(limits=http.Limits(
        max_connections=1000, max_keepalive_connections=100, keepalive_expiry=KEEPALIVE_S))


class OpenAIBackend(Backend):
    """``prompt_scoring``: ``none`` (chat-only APIs; the engine uses output logprobs) or
    ``echo`` (legacy completions servers that return prompt logprobs with ``echo``)."""

    kind = "openai"

    key_env = "OPENAI_API_KEY"   # the one environment variable the key is read from
    remote = True

    def __init__(self, model: str = "gpt-4o", base_url: str | None = None, timeout: float = 60.0,
                 top_logprobs: int = 20, prompt_scoring: str = "none",
                 context_length: int = 128000, chat: bool = True, completion: bool | None = False,
                 follow_up_bound: float = 0.0):
        if prompt_scoring not in ("none", "echo"):
            raise UserError(f"prompt_scoring must be 'none' or 'echo', got {prompt_scoring!r}.")
        if top_logprobs < 0 or timeout <= 0 or context_length < 1:
            raise UserError("top_logprobs must be >= 0, timeout and context_length positive.")
        self.follow_up_bound = check_bound(follow_up_bound)
        self.model, self.base_url, self.timeout = model, base_url, timeout
        self.top_logprobs, self.prompt_scoring = top_logprobs, prompt_scoring
        if completion is None:   # auto: self-hosted servers (vLLM, neuronlens-serve, ...) offer it
            completion = base_url is not None and "api.openai.com" not in base_url
        self.context_length, self.chat, self.completion = context_length, chat, completion
        self.client = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.model}"

    @property
    def url(self) -> str:
        return (self.base_url or OPENAI_URL).rstrip("/")

    def _legacy_k(self, k: int) -> int:
        """``logprobs=k`` for the legacy completions endpoint: at most 5 on OpenAI's own."""
        if urlsplit(self.url).hostname == urlsplit(OPENAI_URL).hostname:
            return min(k, OPENAI_LEGACY_MAX_LOGPROBS)
        return k

    def identity(self) -> dict:
        return {"backend": self.kind, "model": self.model, "base_url": self.url,
                "top_logprobs": self.top_logprobs} | bound_identity(self.follow_up_bound)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(chat=self.chat, completion=self.completion,
                            output_logprobs=self.top_logprobs > 0,
                            prompt_logprobs=self._scores_prompts,
                            context_length=self.context_length)

    @property
    def _scores_prompts(self) -> bool:
        return self.prompt_scoring == "echo"

    def load(self) -> None:
        if self.client is not None:
            return
        import openai

        key = os.environ.get(self.key_env)
        if not key and self.base_url is None:
            raise BackendError(MISSING_KEY)
        self.client = openai.OpenAI(api_key=key or "unused", base_url=self.url,
                                    timeout=self.timeout, max_retries=0,
                                    http_client=short_keepalive_client(openai))

    # ---- one call, errors classified ----------------------------------------------------------
    def _call(self, endpoint: str, parse: Callable[..., Any], *args: Any, **params: Any) -> Any:
        """POST to ``chat`` or ``completions`` and parse the JSON body with ``parse(data, *args)``."""
        self.load()
        api = self.client.chat.completions if endpoint == "chat" else self.client.completions
        usage = None
        try:
            raw = api.with_raw_response.create(model=self.model, **params)
            data = json.loads(raw.text)
            usage = parse_usage(data) if isinstance(data, dict) else Usage()
            return parse(data, *args), usage
        except Exception as e:  # noqa: BLE001 - classified, unknown types re-raised unchanged
            error = classify_error(e, self.model, self.url, self.key_env)
            if usage is not None and isinstance(error, (TransientError, Unscorable)):
                error.usage = usage   # the answer came and cost tokens, though unusable
            raise error from e

    def generate(self, request: GenerateRequest) -> Generation:
        k = min(request.top_logprobs, self.top_logprobs)
        common: dict[str, Any] = {"temperature": request.temperature, "n": request.n,
                                  "seed": request.seed}
        if request.stop:
            common["stop"] = list(request.stop)
        if request.prompt is not None:
            if not self.completion:
                raise BackendError(f"The {self.name} backend is chat-only (completion: false); "
                                   "use the chat prompt format.")
            gen, _ = self._call("completions", parse_completion, prompt=request.prompt,
                                max_tokens=request.max_tokens, **common,
                                **({"logprobs": self._legacy_k(k)} if k else {}))
            return gen
        if not self.chat:
            raise BackendError(f"The {self.name} backend has no chat endpoint (chat: false); "
                               "use the completion prompt format.")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        gen, _ = self._call("chat", parse_chat, messages=messages,
                            max_completion_tokens=request.max_tokens, **common,
                            **({"logprobs": True, "top_logprobs": k} if k else {}))
        return gen

    # ---- prompt scoring -----------------------------------------------------------------------
    def prompt_logprobs(self, requests: Sequence[PromptLogprobRequest]) -> list[TokenDistributions]:
        if not self._scores_prompts:
            return super().prompt_logprobs(requests)
        return [self._score(r) for r in requests]

    def _prompt_tokens(self, prompt: str) -> tuple[list[PromptToken], Usage]:
        """The prompt's tokens with their top-k, from the legacy ``echo`` + ``logprobs``."""
        return self._call("completions", echo_tokens, prompt, prompt=prompt, echo=True,
                          max_tokens=0, logprobs=self._legacy_k(self.top_logprobs), temperature=0)

    def _score(self, request: PromptLogprobRequest) -> TokenDistributions:
        tokens, usage, known = self._placeholders(request)

        def follow_up(texts: list[str]) -> list[dict[str, float]]:
            nonlocal usage
            tops, more = self._call("completions", first_token_tops, len(texts), prompt=texts,
                                    max_tokens=1, logprobs=self._legacy_k(self.top_logprobs),
                                    temperature=0)
            usage = usage + more
            return tops

        scored = score_prompt(request, tokens, follow_up, bound=self.follow_up_bound, known=known)
        return TokenDistributions(scored.probs, scored.mass, usage, bound=scored.bound)

    def _placeholders(self, request: PromptLogprobRequest
                      ) -> tuple[list[PromptToken], Usage, dict[str, dict[str, float]]]:
        """The prompt's tokens with their top-k (at least at the tokens covering the
        placeholders), the usage, and the next-token top-k already known for follow-up prefixes
        (text -> top-k; a follow-up not among them is asked)."""
        tokens, usage = self._prompt_tokens(request.prompt)
        return tokens, usage, {}
