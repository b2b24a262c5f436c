"""The LiteLLM backend: any provider LiteLLM supports (Anthropic, Gemini, OpenRouter, Ollama, any
OpenAI-compatible server through the ``openai/`` prefix and ``api_base``, ...).

Keys come from the provider's usual environment variable (``ANTHROPIC_API_KEY``,
``OPENROUTER_API_KEY``, ...), read by LiteLLM itself; never from a config file.

Chat only, with output logprobs declared: the provider must actually return them when asked
(OpenAI, OpenRouter for some models, vLLM and ``neuronlens-serve`` do; Anthropic does not). A
completion that comes back without them is counted as a failure by the simulation engine, never
read as zeros. Parameters a provider does not accept (``seed``, ``logprobs``) are dropped by
LiteLLM (``drop_params``) rather than refused.

Translation only: no retries here (``num_retries=0``), errors are classified into
`TransientError` (retried by `neuronlens.backends.policy.Policy`) or `BackendError` (fatal).
"""

from __future__ import annotations

import email.utils
import os
import time
from typing import Any

from neuronlens.backends.base import (
    Backend,
    BackendError,
    Capabilities,
    GenerateRequest,
    Generation,
    TransientError,
)
from neuronlens.backends.openai import parse_chat


def import_litellm():
    """LiteLLM, imported lazily (it is slow to import), with its bundled price table: costs are
    reproducible for a given LiteLLM version and no run reaches out to refresh them."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError as e:
        raise ImportError("The litellm backend needs LiteLLM: pip install litellm") from e
    litellm.suppress_debug_info = True   # no "Give Feedback" banner on every retried error
    return litellm


class LiteLLMBackend(Backend):
    """``api_base`` is LiteLLM's name for the endpoint; ``base_url`` the same thing under the name
    the other remote backends' configs use (``explainer.base_url=...``). Give one, not both."""

    remote = True

    def __init__(self, model: str, api_base: str | None = None, timeout: float = 60.0,
                 top_logprobs: int = 20, context_length: int = 128000,
                 base_url: str | None = None):
        if not model:
            raise ValueError("LiteLLMBackend needs a model, e.g. anthropic/claude-sonnet-4-5.")
        if timeout <= 0 or top_logprobs < 0 or context_length < 1:
            raise ValueError("timeout and context_length must be positive, top_logprobs 0 or more.")
        if api_base and base_url and api_base != base_url:
            raise ValueError(f"api_base ({api_base}) and base_url ({base_url}) name one endpoint; "
                             "give one of them.")
        self.model, self.api_base, self.timeout = model, api_base or base_url, timeout
        self.top_logprobs, self.context_length = top_logprobs, context_length
        self._litellm: Any = None

    @property
    def name(self) -> str:
        return f"litellm:{self.model}"

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return Capabilities(chat=True, completion=False, output_logprobs=True,
                            prompt_logprobs=False, context_length=self.context_length)

    def identity(self) -> dict:
        return {"backend": "litellm", "model": self.model, "api_base": self.api_base,
                "top_logprobs": self.top_logprobs}

    def load(self) -> None:
        if self._litellm is None:
            self._litellm = import_litellm()

    def generate(self, request: GenerateRequest) -> Generation:
        if request.prompt is not None:
            raise BackendError(f"The {self.name} backend is chat only; use the chat prompt format.")
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
        try:
            response = self._litellm.completion(**kwargs)
        except Exception as e:
            raise self.classify(e) from e
        try:
            return parse_chat_response(response.model_dump() if hasattr(response, "model_dump") else response)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise TransientError(f"{self.name} sent an answer that could not be parsed: {e!r}") from e

    def classify(self, e: Exception) -> Exception:
        """A LiteLLM exception as `TransientError` (worth retrying) or `BackendError` (fatal)."""
        lm = self._litellm
        if isinstance(e, lm.RateLimitError):
            return TransientError(f"{self.name} is rate limited: {e}", retry_after=retry_after(e))
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


def retry_after(e: Exception) -> float | None:
    """Seconds from a ``Retry-After`` (seconds or HTTP date) or ``retry-after-ms`` header."""
    sources = (getattr(e, "litellm_response_headers", None), getattr(e, "headers", None),
               getattr(getattr(e, "response", None), "headers", None))
    for headers in sources:
        if not headers:
            continue
        lower = {str(k).lower(): str(v) for k, v in headers.items()}
        try:
            if "retry-after-ms" in lower:
                return float(lower["retry-after-ms"]) / 1000
            if "retry-after" in lower:
                value = lower["retry-after"]
                try:
                    return max(0.0, float(value))
                except ValueError:
                    when = email.utils.parsedate_to_datetime(value)
                    return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return None


def parse_chat_response(data: dict) -> Generation:
    """An OpenAI-shaped chat completion (as a dict) into a `Generation` (LiteLLM normalises every
    provider to OpenAI's shape); ``logprobs`` is None on a completion sent without them."""
    return parse_chat(data)

