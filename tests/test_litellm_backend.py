"""The LiteLLM backend against a real loopback server (neuronlens-serve over a tiny random Llama),
through LiteLLM's ``openai/`` provider; its response parser and error classification; and the
capabilities it declares from what LiteLLM forwards to each provider."""

from __future__ import annotations

import logging
import math

import pytest

from neuronlens.backends import policy
from neuronlens.backends.base import (
    BackendError,
    GenerateRequest,
    Message,
    TransientError,
    Unscorable,
)
from neuronlens.backends.litellm import (
    LiteLLMBackend,
    parse_chat_response,
    server_wait,
    supported_logprobs,
)
from neuronlens.backends.policy import Policy
from neuronlens.records import ActivationRecord
from neuronlens.serve import start_server
from neuronlens.scorers.simulation import Simulator, resolve_strategy


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
    backend = LiteLLMBackend(model=f"openai/{server.model}", api_base=server.base_url)
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
    backend = LiteLLMBackend(model=f"openai/{server.model}", api_base=server.base_url)
    out = backend.generate(chat(max_tokens=3))
    assert out.completions[0].logprobs is None and out.completions[0].text


def test_top_logprobs_capped_by_the_backend_setting(server):
    backend = LiteLLMBackend(model=f"openai/{server.model}", api_base=server.base_url,
                             top_logprobs=2)
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
        backend = LiteLLMBackend(model=f"openai/{capped.model}", api_base=capped.base_url,
                                 top_logprobs=50)
        with pytest.raises(BackendError, match="rejected the request"):
            backend.generate(chat(max_tokens=2, top_logprobs=50))   # the server allows 20


def test_faults_are_transient_and_the_policy_retries_them(chat_model_dir, instant):
    faults = ["429", "500", "slow", "none"]
    with start_server(str(chat_model_dir), device="cpu", faults=faults, retry_after=0.25,
                      slow_seconds=1.0) as srv:
        backend = LiteLLMBackend(model=f"openai/{srv.model}", api_base=srv.base_url, timeout=0.3)
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
        backend = LiteLLMBackend(model=f"openai/{srv.model}", api_base=srv.base_url)
        with pytest.raises(TransientError):
            backend.generate(chat(max_tokens=2))


def test_text_prompts_are_refused():
    with pytest.raises(BackendError, match="chat only"):
        LiteLLMBackend(model="openai/tiny").generate(GenerateRequest(prompt="hi"))


def test_capabilities_and_identity():
    b = LiteLLMBackend("anthropic/claude-sonnet-4-5", timeout=5, context_length=200000)
    caps = b.capabilities
    assert caps.chat and not caps.completion and not caps.prompt_logprobs
    assert not caps.output_logprobs          # LiteLLM drops logprobs for Anthropic
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

    assert server_wait(E({"Retry-After": "2"})) == 2.0
    assert server_wait(E({"retry-after-ms": "1500"})) == 1.5
    assert server_wait(E({})) is None and server_wait(Exception()) is None
    assert 0 <= server_wait(E({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0


# ---- capabilities from what LiteLLM forwards, and logprobs never dropped silently ---------------

def forwarded(model: str) -> tuple[bool, bool] | None:
    import litellm

    return supported_logprobs(litellm, model, None)


@pytest.mark.parametrize("model", ["gpt-4o", "openai/gpt-4o-mini", "openai/tiny",
                                   "openrouter/meta-llama/llama-3.1-8b-instruct"])
def test_logprobs_declared_where_litellm_forwards_them(model):
    assert forwarded(model) == (True, True)
    assert LiteLLMBackend(model).capabilities.output_logprobs


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet-4-5", "o3-mini", "gpt-5",
                                   "ollama/llama3"])
def test_no_logprobs_where_litellm_drops_them(model):
    b = LiteLLMBackend(model)
    assert not b.capabilities.output_logprobs
    assert resolve_strategy(b, "auto") == "json"
    with pytest.raises(BackendError, match="returns no output logprobs"):
        resolve_strategy(b, "generated_sequence")


def test_gemini_follows_what_litellm_says():
    """Through AI Studio LiteLLM (1.110) forwards logprobs but not top_logprobs, which would make
    every distribution a one-hot: declared only when LiteLLM forwards both."""
    found = forwarded("gemini/gemini-2.5-flash")
    assert found is not None
    assert LiteLLMBackend("gemini/gemini-2.5-flash").capabilities.output_logprobs == all(found)


def test_an_unknown_model_is_assumed_to_have_none_and_says_so(caplog):
    assert forwarded("no-such-provider/some-model") is None
    with caplog.at_level(logging.WARNING, logger="neuronlens.backends.litellm"):
        assert not LiteLLMBackend("no-such-provider/some-model").capabilities.output_logprobs
    assert "LiteLLM does not know no-such-provider/some-model" in caplog.text
    assert "logprobs=true" in caplog.text
    assert LiteLLMBackend("no-such-provider/some-model", logprobs=True).capabilities.output_logprobs


def test_the_logprobs_setting():
    assert not LiteLLMBackend("gpt-4o", logprobs=False).capabilities.output_logprobs
    assert not LiteLLMBackend("gpt-4o", logprobs="false").capabilities.output_logprobs
    assert not LiteLLMBackend("gpt-4o", top_logprobs=0).capabilities.output_logprobs
    assert LiteLLMBackend("anthropic/claude-sonnet-4-5", logprobs="true").capabilities.output_logprobs
    assert LiteLLMBackend("gpt-4o", logprobs=None).logprobs == "auto"
    with pytest.raises(ValueError, match="auto, true or false"):
        LiteLLMBackend("gpt-4o", logprobs="maybe")
    with pytest.raises(ValueError, match="top_logprobs above 0"):
        LiteLLMBackend("gpt-4o", logprobs=True, top_logprobs=0)


def answer(top: list | None, content: str = "7") -> dict:
    """An OpenAI-shaped chat answer of one token; ``top`` None: no logprobs at all."""
    logprobs = None if top is None else {"content": [
        {"token": content, "logprob": -0.1, "top_logprobs": top}]}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop", "logprobs": logprobs}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1}}


@pytest.fixture
def fake_completion(monkeypatch):
    """LiteLLM's completion() answering from ``replies`` (a list, first out first); the keyword
    arguments of each call land in ``calls``."""
    import litellm

    state = {"calls": [], "replies": []}

    def completion(**kwargs):
        state["calls"].append(kwargs)
        return state["replies"].pop(0)

    monkeypatch.setattr(litellm, "completion", completion)
    return state


def test_empty_top_logprobs_are_unscorable_never_one_hot(fake_completion):
    b = LiteLLMBackend("openai/gpt-4o")
    fake_completion["replies"] = [answer([]), answer(None),
                                  answer([{"token": "7", "logprob": -0.1},
                                          {"token": "6", "logprob": -2.4}])]
    with pytest.raises(Unscorable, match="no top-20 alternatives for the token '7'"):
        b.generate(chat(max_tokens=1, top_logprobs=20))
    with pytest.raises(Unscorable, match="without the logprobs it was asked for"):
        b.generate(chat(max_tokens=1, top_logprobs=20))
    good = b.generate(chat(max_tokens=1, top_logprobs=20))
    assert good.completions[0].logprobs[0].top == (("7", -0.1), ("6", -2.4))
    assert [c["top_logprobs"] for c in fake_completion["calls"]] == [20, 20, 20]
    assert all("allowed_openai_params" not in c for c in fake_completion["calls"])


def test_no_logprobs_are_fine_when_none_were_asked_for(fake_completion):
    fake_completion["replies"] = [answer(None)]
    out = LiteLLMBackend("openai/gpt-4o").generate(chat(max_tokens=1))
    assert out.completions[0].logprobs is None
    assert "logprobs" not in fake_completion["calls"][0]


def test_unscorable_is_not_retried_and_fails_only_its_excerpt(fake_completion, instant):
    """What Gemini answers when LiteLLM drops top_logprobs: each token alone. The excerpt fails
    with the reason, once, and the policy does not retry it."""
    b = LiteLLMBackend("gemini/gemini-2.5-flash", logprobs=True)
    fake_completion["replies"] = [answer([])]
    result = Simulator(Policy(b), strategy="one_at_a_time").simulate(
        "the word cat", [ActivationRecord(["a", "cat"], [0.0, 5.0])])
    assert result.expected == (None,) and result.n_failed == 1
    assert "no top-20 alternatives" in result.errors[0] and result.errors[0].startswith("excerpt 0")
    (call,) = fake_completion["calls"]
    assert call["allowed_openai_params"] == ["logprobs", "top_logprobs"]   # told not to drop them
    assert instant == []


def test_logprobs_are_not_requested_from_a_backend_without_them(fake_completion):
    b = LiteLLMBackend("anthropic/claude-sonnet-4-5")
    with pytest.raises(BackendError, match="returns no output logprobs"):
        b.generate(chat(max_tokens=1, top_logprobs=20))
    assert fake_completion["calls"] == []    # refused before any paid call
    fake_completion["replies"] = [answer(None, content="[1, 2]")]
    assert b.generate(chat(max_tokens=8)).completions[0].text == "[1, 2]"
