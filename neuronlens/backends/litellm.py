"""The LiteLLM backend: any provider LiteLLM supports (Anthropic, Gemini, OpenRouter, Ollama, any
OpenAI-compatible server through the ``openai/`` prefix and ``api_base``, ...).

Keys come from the provider's usual environment variable (``ANTHROPIC_API_KEY``,
``OPENROUTER_API_KEY``, ...), read by LiteLLM itself; never from a config file.

Chat only. Output logprobs are declared only where LiteLLM passes both ``logprobs`` and
``top_logprobs`` on to the model's provider (``litellm.get_supported_openai_params``): OpenAI's
GPT-4 family, OpenRouter, vLLM, ``neuronlens-serve`` behind ``openai/``, ...; in LiteLLM 1.110
not Anthropic, o-series, gpt-5 or Ollama, nor Gemini through AI Studio (which gets ``logprobs``
but not ``top_logprobs``, so every distribution would collapse to the chosen token). Where they
are not declared, the simulation engine picks its logprob-free JSON strategy by itself. A model LiteLLM
does not know is assumed to return none; ``logprobs=true`` in the config overrides that (and makes
LiteLLM forward the two parameters as they are), ``logprobs=false`` turns them off.

Other parameters a provider does not accept (``seed``, ...) are dropped by LiteLLM
(``drop_params``), but logprobs are never lost silently: an answer to a request for top-k
logprobs that comes back without them, or with a token that has no alternatives, raises
`Unscorable` (that excerpt fails with the reason, and is not retried), never a one-hot guess.

Translation only: no retries here (``num_retries=0``), errors are classified into
`TransientError` (retried by `neuronlens.backends.policy.Policy`) or `BackendError` (fatal).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from neuronlens.backends.prices import import_litellm
from neuronlens.backends.base import (
    retry_after,
    Backend,
    BackendError,
    Capabilities,
    GenerateRequest,
    Generation,
    TransientError,
    Unscorable,
)
from neuronlens.backends.openai import parse_chat

log = logging.getLogger(__name__)

LOGPROBS_MODES = ("auto", "true", "false")


def logprobs_mode(value: bool | str | None) -> str:
    """``logprobs`` from a config as one of `LOGPROBS_MODES` (YAML reads true/false as booleans)."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    mode = str(value).strip().lower()
    if mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs must be auto, true or false, not {value!r}.")
    return mode


def supported_logprobs(litellm: Any, model: str, api_base: str | None) -> tuple[bool, bool] | None:
    """Whether LiteLLM passes ``logprobs`` and ``top_logprobs`` on to ``model``'s provider (rather
    than dropping them); None when LiteLLM knows neither the provider nor its parameters."""
    try:
        name, provider, _, _ = litellm.get_llm_provider(model=model, api_base=api_base)
        params = litellm.get_supported_openai_params(model=name, custom_llm_provider=provider)
    except Exception:   # LiteLLM raises its BadRequestError for a provider it does not know
        return None
    if params is None:
        return None
    return "logprobs" in params, "top_logprobs" in params


def require_logprobs(generation: Generation, name: str, k: int) -> Generation:
    """``generation`` unchanged if every completion carries the top-k logprobs asked for; else
    `Unscorable`: a token without alternatives would read as a one-hot distribution."""
    for c in generation.completions:
        if c.logprobs is None or (c.text and not c.logprobs):
            raise Unscorable(f"{name} answered without the logprobs it was asked for (the "
                             "provider or LiteLLM dropped them); set logprobs=false in its "
                             "config to simulate without them.")
        bare = next((t for t in c.logprobs if not t.top), None)
        if bare is not None:
            raise Unscorable(f"{name} answered with no top-{k} alternatives for the token "
                             f"{bare.token!r} (the provider or LiteLLM dropped top_logprobs), so "
                             "its distribution cannot be read; set logprobs=false in its config "
                             "to simulate without them.")
    return generation


class LiteLLMBackend(Backend):
    """``api_base`` is LiteLLM's name for the endpoint; ``base_url`` the same thing under the name
    the other remote backends' configs use (``explainer.base_url=...``). Give one, not both.

    ``logprobs``: ``auto`` (output logprobs where LiteLLM forwards both ``logprobs`` and
    ``top_logprobs`` to the provider; none for a model LiteLLM does not know), ``true`` (the
    model returns them: LiteLLM is told to forward both parameters as they are) or ``false``."""

    remote = True

    def __init__(self, model: str, api_base: str | None = None, timeout: float = 60.0,
                 top_logprobs: int = 20, context_length: int = 128000,
                 base_url: str | None = None, logprobs: bool | str | None = "auto"):
        if not model:
            raise ValueError("LiteLLMBackend needs a model, e.g. anthropic/claude-sonnet-4-5.")
        if timeout <= 0 or top_logprobs < 0 or context_length < 1:
            raise ValueError("timeout and context_length must be positive, top_logprobs 0 or more.")
        if api_base and base_url and api_base != base_url:
            raise ValueError(f"api_base ({api_base}) and base_url ({base_url}) name one endpoint; "
                             "give one of them.")
        self.logprobs = logprobs_mode(logprobs)
        if self.logprobs == "true" and top_logprobs == 0:
            raise ValueError("logprobs=true needs top_logprobs above 0.")
        self.model, self.api_base, self.timeout = model, api_base or base_url, timeout
        self.top_logprobs, self.context_length = top_logprobs, context_length
        self._litellm: Any = None
        self._capabilities: Capabilities | None = None
        self._lock = threading.Lock()   # worked out once, even when many threads ask at once

    @property
    def name(self) -> str:
        return f"litellm:{self.model}"

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        with self._lock:
            if self._capabilities is None:
                self._capabilities = Capabilities(
                    chat=True, completion=False, output_logprobs=self._output_logprobs(),
                    prompt_logprobs=False, context_length=self.context_length)
            return self._capabilities

    def _output_logprobs(self) -> bool:
        if self.top_logprobs == 0 or self.logprobs == "false":
            return False
        if self.logprobs == "true":
            return True
        self.load()
        found = supported_logprobs(self._litellm, self.model, self.api_base)
        if found is None:
            log.warning("LiteLLM does not know %s, so whether it returns logprobs is unknown; "
                        "assuming it does not (set logprobs=true in its config if it does).",
                        self.model)
            return False
        if not all(found):
            missing = " and ".join(p for p, ok in zip(("logprobs", "top_logprobs"), found) if not ok)
            log.info("LiteLLM does not pass %s on to %s, so it declares no output logprobs.",
                     missing, self.model)
        return all(found)

    def identity(self) -> dict:
        return {"backend": "litellm", "model": self.model, "api_base": self.api_base,
                "top_logprobs": self.top_logprobs}

    def load(self) -> None:
        if self._litellm is None:
            self._litellm = import_litellm()

    def generate(self, request: GenerateRequest) -> Generation:
        if request.prompt is not None:
            raise BackendError(f"The {self.name} backend is chat only; use the chat prompt format.")
        if request.top_logprobs and not self.capabilities.output_logprobs:
            raise BackendError(f"The {self.name} backend returns no output logprobs (see its "
                               "logprobs setting), yet top_logprobs were asked for; use a "
                               "strategy without logprobs (json).")
        self.load()
        k = min(request.top_logprobs, self.top_logprobs) if request.top_logprobs else 0
        kwargs: dict[str, Any] = dict(
            model=self.model, messages=[{"role": m.role, "content": m.content} for m in request.messages],
            temperature=request.temperature, max_tokens=request.max_tokens, seed=request.seed,
            api_base=self.api_base, timeout=self.timeout, num_retries=0, drop_params=True)
        if request.n != 1:
            kwargs["n"] = request.n
        if request.stop:
            kwargs["stop"] = list(request.stop)
        if k:
            kwargs.update(logprobs=True, top_logprobs=k)
            if self.logprobs == "true":   # the user says the model returns them: never drop them
                kwargs["allowed_openai_params"] = ["logprobs", "top_logprobs"]
        try:
            response = self._litellm.completion(**kwargs)
        except Exception as e:
            raise self.classify(e) from e
        try:
            generation = parse_chat_response(
                response.model_dump() if hasattr(response, "model_dump") else response)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise TransientError(f"{self.name} sent an answer that could not be parsed: {e!r}") from e
        return require_logprobs(generation, self.name, k) if k else generation

    def classify(self, e: Exception) -> Exception:
        """A LiteLLM exception as `TransientError` (worth retrying) or `BackendError` (fatal)."""
        lm = self._litellm
        if isinstance(e, lm.RateLimitError):
            return TransientError(f"{self.name} is rate limited: {e}", retry_after=server_wait(e))
        if isinstance(e, (lm.Timeout, lm.APIConnectionError, lm.InternalServerError,
                          lm.ServiceUnavailableError, lm.BadGatewayError)):
            return TransientError(f"{self.name} failed for now: {e}")
        if isinstance(e, lm.ContextWindowExceededError):
            return BackendError(f"The prompt is longer than {self.model} accepts: {e}")
        if isinstance(e, (lm.AuthenticationError, lm.PermissionDeniedError)):
            return BackendError(f"{self.model} refused the credentials{self._missing_keys()}: {e}")
        if isinstance(e, lm.NotFoundError):
            return BackendError(f"{self.model} was not found at "
                                f"{self.api_base or 'its provider'}; check the model name: {e}")
        if isinstance(e, lm.BadRequestError):
            return BackendError(f"{self.model} rejected the request{self._missing_keys()}: {e}")
        if isinstance(e, lm.APIError) and getattr(e, "status_code", 0) >= 500:
            return TransientError(f"{self.name} failed for now: {e}")
        if isinstance(e, lm.APIError):
            return BackendError(f"{self.model} failed: {e}")
        return e  # not LiteLLM's: a bug, shown as it is

    def _missing_keys(self) -> str:
        try:
            missing = self._litellm.validate_environment(model=self.model,
                                                         api_base=self.api_base)["missing_keys"]
        except Exception:
            return ""
        return f" (is {' / '.join(missing)} set in the environment?)" if missing else ""


def server_wait(e: Exception) -> float | None:
    """The wait a LiteLLM exception's server asked for, from whichever headers it carries."""
    for headers in (getattr(e, "litellm_response_headers", None), getattr(e, "headers", None),
                    getattr(getattr(e, "response", None), "headers", None)):
        if headers:
            return retry_after(headers)
    return None


def parse_chat_response(data: dict) -> Generation:
    """An OpenAI-shaped chat completion (as a dict) into a `Generation` (LiteLLM normalises every
    provider to OpenAI's shape); ``logprobs`` is None on a completion sent without them."""
    return parse_chat(data)

