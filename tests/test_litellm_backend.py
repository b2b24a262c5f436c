"""The LiteLLM backend against a real loopback server (neuronlens-serve over a tiny random Llama),
through LiteLLM's ``openai/`` provider; and its response parser and error classification."""

from __future__ import annotations

import math

import pytest

from neuronlens.backends import policy
from neuronlens.backends.base import (
    BackendError,
    GenerateRequest,
    Message,
    TransientError,
)
from neuronlens.backends.litellm import LiteLLMBackend, parse_chat_response, retry_after
from neuronlens.backends.policy import Policy
from neuronlens.serve import start_server


def chat(text: str = "Name a colour.", **kw) -> GenerateRequest:
    return GenerateRequest(messages=(Message("system", "Be brief."), Message("user", text)), **kw)


@pytest.fixture(scope="module")
def server(chat_model_dir):
    handle = start_server(str(chat_model_dir), device="cpu")
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "unused")


@pytest.fixture
def instant(monkeypatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(policy, "sleep", waits.append)
    return waits


def test_generates_text_and_top_logprobs(server):
    backend = LiteLLMBackend(model="openai/tiny", api_base=server.base_url)
    out = backend.generate(chat(max_tokens=6, top_logprobs=5))
    (c,) = out.completions
    assert c.logprobs is not None and 1 <= len(c.logprobs) <= 6
    assert "".join(t.token for t in c.logprobs) == c.text
    for t in c.logprobs:
        assert len(t.top) == 5 and t.top[0][1] >= t.top[-1][1]
        assert t.logprob <= 0 and math.isclose(t.logprob, t.top[0][1], abs_tol=1e-4)  # greedy
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens == len(c.logprobs)
    assert c.finish_reason in ("stop", "length")


def test_without_top_logprobs_no_logprobs_come_back(server):
    out = LiteLLMBackend(model="openai/tiny", api_base=server.base_url).generate(chat(max_tokens=3))
    assert out.completions[0].logprobs is None and out.completions[0].text


def test_top_logprobs_capped_by_the_backend_setting(server):
    backend = LiteLLMBackend(model="openai/tiny", api_base=server.base_url, top_logprobs=2)
    out = backend.generate(chat(max_tokens=2, top_logprobs=20))
    assert all(len(t.top) == 2 for t in out.completions[0].logprobs)


def test_unknown_model_is_a_fatal_error(chat_model_dir):
    with start_server(str(chat_model_dir), device="cpu", strict_model=True) as strict:
        backend = LiteLLMBackend(model="openai/no-such-model", api_base=strict.base_url)
        with pytest.raises(BackendError, match="openai/no-such-model was not found"):
            backend.generate(chat(max_tokens=2))
        ok = LiteLLMBackend(model=f"openai/{chat_model_dir}", api_base=strict.base_url)
        assert ok.generate(chat(max_tokens=2)).completions[0].text


def test_a_bad_request_is_fatal(chat_model_dir):
    with start_server(str(chat_model_dir), device="cpu", max_logprobs=20) as capped:
        backend = LiteLLMBackend(model="openai/tiny", api_base=capped.base_url, top_logprobs=50)
        with pytest.raises(BackendError, match="rejected the request"):
            backend.generate(chat(max_tokens=2, top_logprobs=50))   # the server allows 20


def test_faults_are_transient_and_the_policy_retries_them(chat_model_dir, instant):
    faults = ["429", "500", "slow", "none"]
    with start_server(str(chat_model_dir), device="cpu", faults=faults, retry_after=0.25,
                      slow_seconds=1.0) as srv:
        backend = LiteLLMBackend(model="openai/tiny", api_base=srv.base_url, timeout=0.3)
        with pytest.raises(TransientError) as limited:
            backend.generate(chat(max_tokens=2))
        assert limited.value.retry_after == 0.25
        with pytest.raises(TransientError):
            backend.generate(chat(max_tokens=2))
        with pytest.raises(TransientError):
            backend.generate(chat(max_tokens=2))
        assert backend.generate(chat(max_tokens=2)).completions[0].text

        p = Policy(backend, base_delay=0.01)
        assert p.generate(chat("again", max_tokens=2)).completions[0].text
        assert instant[0] >= 0.25 and len(instant) == 3
        s = p.stats()
        assert (s["requests"], s["retries"]) == (4, 3)
        assert s["cost_known"] is False    # a local model is not in LiteLLM's price table
    assert srv.faults == {"429": 2, "500": 2, "slow": 2, "none": 2}   # no hidden client retries


def test_a_truncated_answer_is_transient(chat_model_dir):
    with start_server(str(chat_model_dir), device="cpu", faults=["truncated"]) as srv:
        backend = LiteLLMBackend(model="openai/tiny", api_base=srv.base_url)
        with pytest.raises(TransientError):
            backend.generate(chat(max_tokens=2))


def test_text_prompts_are_refused():
    with pytest.raises(BackendError, match="chat only"):
        LiteLLMBackend(model="openai/tiny").generate(GenerateRequest(prompt="hi"))


def test_capabilities_and_identity():
    b = LiteLLMBackend("anthropic/claude-sonnet-4-5", timeout=5, context_length=200000)
    caps = b.capabilities
    assert caps.chat and not caps.completion and caps.output_logprobs and not caps.prompt_logprobs
    assert caps.context_length == 200000
    assert b.identity() == {"backend": "litellm", "model": "anthropic/claude-sonnet-4-5",
                            "api_base": None, "top_logprobs": 20}  # k changes the answers


def test_base_url_is_another_name_for_api_base():
    assert LiteLLMBackend("openai/m", base_url="http://h/v1").identity()["api_base"] == "http://h/v1"
    with pytest.raises(ValueError, match="one endpoint"):
        LiteLLMBackend("openai/m", api_base="http://a/v1", base_url="http://b/v1")


def test_configs_build_the_backend():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf"
    for role, model in (("explainer", "anthropic/claude-sonnet-4-5"),
                        ("simulator", "openrouter/meta-llama/llama-3.1-8b-instruct")):
        node = OmegaConf.load(conf / role / "litellm.yaml")
        node.base_url = "http://localhost:11434"
        backend = instantiate(node)
        assert isinstance(backend, LiteLLMBackend) and backend.model == model
        assert backend.api_base == "http://localhost:11434"


def test_missing_key_is_named(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    import litellm

    b = LiteLLMBackend("anthropic/claude-sonnet-4-5")
    b.load()
    error = litellm.AuthenticationError("invalid x-api-key", "anthropic", "claude-sonnet-4-5")
    out = b.classify(error)
    assert isinstance(out, BackendError) and "ANTHROPIC_API_KEY" in str(out)
    assert "anthropic/claude-sonnet-4-5" in str(out)


def test_parse_a_recorded_response():
    data = {"choices": [
        {"index": 1, "message": {"content": None}, "finish_reason": "length", "logprobs": None},
        {"index": 0, "message": {"role": "assistant", "content": "ab"}, "finish_reason": "stop",
         "logprobs": {"content": [
             {"token": "a", "logprob": -0.1, "bytes": [97],
              "top_logprobs": [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -2.5}]},
             {"token": "b", "logprob": -0.3, "bytes": [98], "top_logprobs": []}]}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}
    g = parse_chat_response(data)
    assert [c.text for c in g.completions] == ["ab", ""]
    assert g.completions[0].logprobs[0].top == (("a", -0.1), ("b", -2.5))
    assert g.completions[0].logprobs[1].top == ()
    assert g.completions[1].logprobs is None and g.completions[1].finish_reason == "length"
    assert (g.usage.prompt_tokens, g.usage.completion_tokens) == (7, 2)


def test_retry_after_headers():
    class E(Exception):
        def __init__(self, headers):
            self.headers = headers

    assert retry_after(E({"Retry-After": "2"})) == 2.0
    assert retry_after(E({"retry-after-ms": "1500"})) == 1.5
    assert retry_after(E({})) is None and retry_after(Exception()) is None
    assert 0 <= retry_after(E({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
