"""neuronlens-serve on loopback with a tiny random model, read with the official openai client.
By default it must answer as a real vLLM server does (strict model name, at most 20 logprobs,
token ids only when asked for, running-sum text offsets)."""

from __future__ import annotations

import json
import re
from itertools import accumulate

import httpx
import pytest
import torch
from openai import InternalServerError, OpenAI

from neuronlens.serve import score_prompt, start_server
from agreement import REL   # float32 along two paths: within REL of the value's scale
from neuronlens.models import load_model

PROMPT = "The cat sat on the mat.\n1\t2\tthree"
WIDE = "Cats 🐱 and 猫\tsat \ufffd on\nthe mat 🐟🐟."   # characters split into byte tokens


@pytest.fixture(scope="module")
def server(chat_model_dir):
    handle = start_server(str(chat_model_dir), device="cpu")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def direct(chat_model_dir):
    return load_model(str(chat_model_dir), "cpu", "auto")


@pytest.fixture(scope="module")
def bos_server(bos_llama_dir):
    with start_server(str(bos_llama_dir), device="cpu") as handle:
        yield handle


def test_models_lists_the_served_model_with_its_root(client, server, chat_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [str(chat_model_dir)] == [server.model]
    assert models[0].owned_by == "neuronlens"
    card = models[0].model_dump()
    assert card["root"] == str(chat_model_dir.resolve()) and card["max_model_len"] == 4096
    assert server.requests["/v1/models"] >= 2   # the readiness probe and this call


def test_completion(client, server):
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0)
    assert out.model == server.model and out.object == "text_completion"
    assert len(out.choices) == 1 and isinstance(out.choices[0].text, str)
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens <= 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = client.completions.create(model=server.model, prompt=[PROMPT], max_tokens=5,
                                      temperature=0, n=2)
    assert [c.text for c in again.choices] == [out.choices[0].text] * 2
    # the prompt's length, also when the server ran only its last token (the kept prefix)
    assert again.usage.prompt_tokens == out.usage.prompt_tokens == len(server.state.backend.tokenizer(PROMPT)["input_ids"])
    unnamed = httpx.post(f"{server.base_url}/completions", json={"prompt": PROMPT, "max_tokens": 5,
                                                                 "temperature": 0})
    assert unnamed.json()["model"] == server.model      # no model: the served one, as vLLM
    assert unnamed.json()["choices"][0]["text"] == out.choices[0].text


def test_chat_top_logprobs_match_the_model(client, server, direct):
    model, tokenizer = direct
    messages = [{"role": "user", "content": "Say something."}]
    out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=5)
    content = out.choices[0].logprobs.content
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])
    assert out.usage.prompt_tokens == len(ids)
    for step in content:  # greedy: the server's chosen token is the argmax we append
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        top = lp.topk(5)
        assert [t.token for t in step.top_logprobs] == [tokenizer.decode([i]) for i in top.indices.tolist()]
        assert [t.logprob for t in step.top_logprobs] == pytest.approx(top.values.tolist(), rel=REL, abs=REL)
        assert step.logprob == pytest.approx(top.values[0].item(), rel=REL, abs=REL)
        assert step.bytes == list(step.token.encode())
        ids.append(int(top.indices[0]))


def _legacy(tokenizer, token_id: int) -> str:
    """What OpenAI's legacy API would show for a token of a byte-level BPE: its text, or
    ``bytes:\\xNN...`` if its bytes are not UTF-8 on their own."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte = {c: b for b, c in bytes_to_unicode().items()}
    raw = bytes(byte[c] for c in tokenizer.convert_ids_to_tokens(token_id))
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _direct_scores(model, tokenizer, prompt):
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    return ids, lp


def _running_sum(tokens: list[str]) -> list[int]:
    return list(accumulate(map(len, tokens[:-1]), initial=0))


def test_echo_scores_the_prompt(client, server, direct):
    model, tokenizer = direct
    out = client.completions.create(model=server.model, prompt=PROMPT, echo=True, logprobs=5,
                                    max_tokens=0)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0
    ids, lp = _direct_scores(model, tokenizer, PROMPT)
    lps = choice.logprobs
    assert lps.tokens == [tokenizer.decode([i]) for i in ids]
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    want = [lp[j - 1, ids[j]].item() for j in range(1, len(ids))]
    assert lps.token_logprobs[1:] == pytest.approx(want, rel=REL, abs=REL)
    for j in range(1, len(ids)):
        top = lp[j - 1].topk(5)
        got = lps.top_logprobs[j]
        want_top = {_legacy(tokenizer, i): v for i, v in zip(top.indices.tolist(),
                                                             top.values.tolist())}
        assert got == pytest.approx(want_top, rel=REL, abs=REL)
    assert lps.text_offset == _running_sum(lps.tokens)
    for token, offset in zip(lps.tokens, lps.text_offset):   # no BOS, no partial characters
        assert choice.text[offset:offset + len(token)] == token


def test_echo_with_generation_continues_the_offsets(client, server):
    out = client.completions.create(model=server.model, prompt=PROMPT, echo=True, logprobs=2,
                                    max_tokens=3, temperature=0)
    choice = out.choices[0]
    lps = choice.logprobs
    assert choice.text.startswith(PROMPT)
    assert len(lps.tokens) == out.usage.prompt_tokens + out.usage.completion_tokens
    assert lps.text_offset == _running_sum(lps.tokens)
    for token, offset in zip(lps.tokens, lps.text_offset):
        assert choice.text[offset:offset + len(token)] == token


def _bytes(token: str) -> bytes:
    if token.startswith("bytes:"):
        return bytes.fromhex(token[6:].replace("\\x", ""))
    return token.encode()


def test_echo_writes_partial_characters_as_bytes_and_counts_the_bos(bos_server, bos_llama_dir):
    """As OpenAI's legacy API: a token that is not UTF-8 on its own reads ``bytes:\\xNN``; as
    vLLM: the BOS is echoed and text_offset is the running sum of the tokens' lengths."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bos_llama_dir)
    r = httpx.post(f"{bos_server.base_url}/completions",
                   json={"model": bos_server.model, "prompt": WIDE, "echo": True, "logprobs": 20,
                         "max_tokens": 0})
    choice = r.json()["choices"][0]
    lps = choice["logprobs"]
    ids = tokenizer(WIDE)["input_ids"]
    assert choice["text"] == WIDE and len(lps["tokens"]) == len(ids)
    assert lps["tokens"][0] == "<|bos|>" and lps["top_logprobs"][0] is None
    assert lps["tokens"][1:] == [_legacy(tokenizer, i) for i in ids[1:]]
    assert b"".join(_bytes(t) for t in lps["tokens"][1:]) == WIDE.encode()
    partial = [t for t in lps["tokens"] if t.startswith("bytes:")]
    assert "bytes:\\xf0\\x9f" in partial and len(partial) >= 8   # 🐱, 猫, U+FFFD, 🐟🐟
    assert all(re.fullmatch(r"bytes:(\\x[0-9a-f]{2})+", t) for t in partial)
    assert not any("\ufffd" in t for t in lps["tokens"])
    keys = [k for top in lps["top_logprobs"][1:] for k in top]
    assert any(k.startswith("bytes:") for k in keys) and not any("\ufffd" in k for k in keys)
    assert lps["text_offset"] == _running_sum(lps["tokens"])
    assert lps["text_offset"][1] == len("<|bos|>")


def test_token_ids_only_with_return_token_ids(server, direct):
    _, tokenizer = direct
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 3, "temperature": 0,
            "prompt_logprobs": 1, "logprobs": 1}
    plain = httpx.post(f"{server.base_url}/completions", json=body).json()["choices"][0]
    assert "prompt_token_ids" not in plain and "token_ids" not in plain
    asked = httpx.post(f"{server.base_url}/completions",
                       json=body | {"return_token_ids": True}).json()["choices"][0]
    assert asked["prompt_token_ids"] == tokenizer(PROMPT)["input_ids"]
    assert len(asked["token_ids"]) == len(asked["logprobs"]["tokens"])
    assert tokenizer.decode(asked["token_ids"]) == asked["text"]


def test_vllm_prompt_logprobs(client, server, direct):
    model, tokenizer = direct
    raw = client.completions.with_raw_response.create(
        model=server.model, prompt=PROMPT, max_tokens=1, temperature=0,
        extra_body={"prompt_logprobs": 3, "return_token_ids": True})
    choice = json.loads(raw.text)["choices"][0]
    ids, lp = _direct_scores(model, tokenizer, PROMPT)
    assert choice["prompt_token_ids"] == ids
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        entry = entries[j]
        actual = entry[str(ids[j])]   # the real prompt token is always there
        assert actual["logprob"] == pytest.approx(lp[j - 1, ids[j]].item(), rel=REL, abs=REL)
        assert actual["rank"] == int((lp[j - 1] > lp[j - 1, ids[j]]).sum()) + 1
        assert actual["decoded_token"] == tokenizer.decode([ids[j]])
        top = lp[j - 1].topk(3)
        for r, (i, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            assert entry[str(i)]["rank"] == r + 1
            assert entry[str(i)]["logprob"] == pytest.approx(v, rel=REL, abs=REL)
        assert len(entry) in (3, 4)


def test_score_prompt_agrees_with_a_plain_forward(direct):
    model, tokenizer = direct
    ids, lp = _direct_scores(model, tokenizer, PROMPT)
    scores = score_prompt(model, ids, 0)
    assert len(scores.logprob) == len(ids) - 1 and scores.top == [[]] * (len(ids) - 1)
    assert scores.rank == [int((lp[j] > lp[j, ids[j + 1]]).sum()) + 1 for j in range(len(ids) - 1)]


def test_the_prefix_cache_scores_like_a_fresh_forward(direct):
    """Prompts that share a prefix with the one before (longer, shorter, diverging, unrelated, or
    asking for more alternatives) score as a plain forward pass scores them."""
    from neuronlens.serve import PrefixCache

    model, tokenizer = direct
    cache = PrefixCache(model, keep=5)
    for text, k in ((PROMPT, 5), (PROMPT + " and more", 5), (PROMPT[:20], 3), (PROMPT[:20] + " x", 8),
                    ("nothing alike", 5), (PROMPT, 5)):
        ids = list(tokenizer(text)["input_ids"])
        got, last = cache.run(ids, k)
        want = score_prompt(model, ids, k)
        assert got.rank == want.rank
        assert got.logprob == pytest.approx(want.logprob, rel=REL, abs=REL)
        assert [[t for t, _ in top[:k]] for top in got.top] == [[t for t, _ in top] for top in want.top]
        full = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        assert torch.allclose(last, full, rtol=REL, atol=REL)


def test_bad_requests_get_openai_error_bodies(server):
    m = server.model
    for body in ({"model": m}, {"model": m, "prompt": ""}, {"model": m, "prompt": []},
                 {"model": m, "prompt": "x", "logprobs": -1}):
        r = httpx.post(f"{server.base_url}/completions", json=body)
        assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "code"}
    r = httpx.post(f"{server.base_url}/chat/completions", json={"model": m, "messages": []})
    assert r.status_code == 400
    greedy = {"model": m, "prompt": [1, 2], "max_tokens": 1, "temperature": 0, "logprobs": 1}
    for extra, why in (({"logprob_token_ids": [3]}, "logprobs set"),
                       ({"logprob_token_ids": [10 ** 9], "logprobs": 1}, "must lie in"),
                       ({"logit_bias": {"x": 1}}, "keys are token ids"),
                       ({"logprob_token_ids": [3], "temperature": 1}, "greedy completions only")):
        body = greedy | extra
        if why == "logprobs set":
            body.pop("logprobs")
        r = httpx.post(f"{server.base_url}/completions", json=body)
        assert r.status_code == 400 and why in r.json()["error"]["message"], (extra, r.text)
    r = httpx.post(f"{server.base_url}/completions", json=greedy | {"logprob_token_ids": [3, 4, 5]})
    (step,) = r.json()["choices"][0]["logprobs"]["top_logprobs"]
    assert len(step) >= 3   # the written token and the three asked for, past a top-1


def test_a_list_of_prompts_gets_one_choice_each_in_order(server):
    r = httpx.post(f"{server.base_url}/completions",
                   json={"model": server.model, "prompt": ["one two", "three"], "max_tokens": 0,
                         "echo": True, "logprobs": 2, "n": 2})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == ["one two", "one two", "three", "three"]


def test_many_next_token_prompts_at_once_answer_as_one_by_one(server):
    """A simulator's follow-ups: greedy one-token completions of prompts that share a long prefix,
    computed with one prefix cache, give what each prompt gets on its own (through generate)."""
    base = "the cat sat on the mat and then the dog ran to the park\t"
    prompts = [base + "1", base + "12", base + "1 2", "a different start"]
    ask = {"model": server.model, "max_tokens": 1, "temperature": 0, "logprobs": 5}
    together = httpx.post(f"{server.base_url}/completions", json=ask | {"prompt": prompts}).json()
    alone = [httpx.post(f"{server.base_url}/completions", json=ask | {"prompt": p}).json()["choices"][0]
             for p in prompts]
    assert [c["index"] for c in together["choices"]] == [0, 1, 2, 3]
    for got, want in zip(together["choices"], alone):
        assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], rel=REL, abs=REL)
        assert got["logprobs"]["top_logprobs"][0].keys() == want["logprobs"]["top_logprobs"][0].keys()
        for key, value in want["logprobs"]["top_logprobs"][0].items():
            assert got["logprobs"]["top_logprobs"][0][key] == pytest.approx(value, rel=REL, abs=REL)
    assert together["usage"]["prompt_tokens"] == sum(
        httpx.post(f"{server.base_url}/completions", json=ask | {"prompt": p}).json()["usage"]["prompt_tokens"]
        for p in prompts)


def test_max_logprobs_is_20_by_default_like_vllm(server, tiny_llama_dir):
    def post(path: str, url: str = server.base_url, **fields) -> httpx.Response:
        base = ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}
                if path == "chat/completions" else {"prompt": "x y", "max_tokens": 0, "echo": True})
        return httpx.post(f"{url}/{path}", json={"model": server.model, "max_tokens": 1}
                          | base | fields)

    assert post("completions", logprobs=20).status_code == 200
    assert post("completions", logprobs=0, prompt_logprobs=20).status_code == 200
    for too_many in (post("completions", logprobs=21), post("completions", prompt_logprobs=21),
                     post("chat/completions", top_logprobs=21)):
        assert too_many.status_code == 400
        assert "at most 20" in too_many.json()["error"]["message"]
    with start_server(str(tiny_llama_dir), device="cpu", max_logprobs=None,
                      strict_model=False) as unlimited:
        r = post("completions", unlimited.base_url, logprobs=600)
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["top_logprobs"][1]) > 20
    # stopped, it no longer counts the forward passes of the model it shared
    assert unlimited.state._count not in unlimited.state.backend.model.get_input_embeddings()._forward_hooks.values()


def test_stats_endpoint(server):
    stats = lambda: httpx.get(server.base_url.removesuffix("/v1") + "/stats").json()   # noqa: E731
    assert stats()["requests"]["/v1/completions"] == server.requests["/v1/completions"] > 0
    assert stats()["faults"] == {"none": sum(server.faults.values())}
    # the token positions the model ran: a prompt scored whole, then again from the prefix cache
    server.state.reset_prefix_cache()
    ask = {"model": server.model, "prompt": "The quick brown fox jumps over the lazy dog " * 4,
           "max_tokens": 0, "echo": True, "logprobs": 1}
    counts = [stats()["tokens_computed"]]
    for _ in range(2):
        n = httpx.post(f"{server.base_url}/completions", json=ask).json()["usage"]["prompt_tokens"]
        counts.append(stats()["tokens_computed"])
    assert counts[1] - counts[0] == n > 20
    assert 0 < counts[2] - counts[1] <= 2   # the last position or two run again


def test_another_model_name_is_a_404_unless_lenient(server, tiny_gpt2_dir):
    for path, fields in (("completions", {"prompt": "hi"}),
                         ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(f"{server.base_url}/{path}", json={"model": "gpt-4"} | fields)
        assert r.status_code == 404
        assert r.json()["error"] == {"message": "The model `gpt-4` does not exist.",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "model_not_found"}
    with start_server(str(tiny_gpt2_dir), device="cpu", strict_model=False) as lenient:
        r = httpx.post(f"{lenient.base_url}/completions",
                       json={"model": "gpt-4", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "gpt-4"


def test_faults_in_a_cycle(tiny_gpt2_dir):
    faults = ["none", 429, "500", "slow", "truncated", "wrong_length"]
    body = {"model": str(tiny_gpt2_dir), "prompt": "one\ntwo", "max_tokens": 4, "temperature": 0,
            "logprobs": 2, "prompt_logprobs": 2, "return_token_ids": True}
    with start_server(str(tiny_gpt2_dir), device="cpu", faults=faults, retry_after=0.25,
                      slow_seconds=1.0) as srv:
        url = f"{srv.base_url}/completions"
        normal = httpx.post(url, json=body)
        assert normal.status_code == 200
        limited = httpx.post(url, json=body)
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "0.25"
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        failed = httpx.post(url, json=body)
        assert failed.status_code == 500 and "error" in failed.json()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, timeout=0.3)
        truncated = httpx.post(url, json=body)
        assert truncated.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(truncated.text)
        short = httpx.post(url, json=body).json()["choices"][0]
        full = normal.json()["choices"][0]
        assert len(short["prompt_logprobs"]) == len(full["prompt_logprobs"]) - 1
        assert short["prompt_token_ids"] == full["prompt_token_ids"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert len(short["logprobs"][key]) == len(full["logprobs"][key]) - 1
        assert short["text"] == full["text"][:full["text"].rstrip("\n").rfind("\n") + 1]
        again = httpx.post(url, json=body)   # the cycle starts over
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == full["text"]
        assert srv.faults == {"none": 2, "429": 1, "500": 1, "slow": 1, "truncated": 1, "wrong_length": 1}
        assert srv.requests["/v1/completions"] == 7
        client = OpenAI(base_url=srv.base_url, api_key="unused", max_retries=1)
        with pytest.raises(InternalServerError):   # 429, honoured Retry-After, then 500
            client.completions.create(model=srv.model, prompt="hi", max_tokens=1)
        assert srv.requests["/v1/completions"] == 9 and srv.faults["429"] == 2


def test_chat_without_template_is_a_400(tiny_gpt2_dir):
    with start_server(str(tiny_gpt2_dir), device="cpu") as srv:
        r = httpx.post(f"{srv.base_url}/chat/completions",
                       json={"model": srv.model, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
