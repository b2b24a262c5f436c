"""The policy around backends: retries with backoff, the response cache, bounded concurrency and
token/dollar accounting, against a fake backend that counts its calls."""

from __future__ import annotations

import dataclasses
import math
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import pytest

from neuronlens.backends import policy
from neuronlens.backends.base import (
    Backend,
    BackendError,
    Capabilities,
    Completion,
    GenerateRequest,
    Generation,
    Message,
    PromptLogprobRequest,
    TokenDistributions,
    TokenLogprob,
    TransientError,
    Usage,
)
from neuronlens.backends.policy import Policy, ResponseCache, cache_key


class Fake(Backend):
    """Answers from its inputs; fails ``fail`` times first with ``error``; records calls."""

    capabilities = Capabilities(chat=True, completion=True, output_logprobs=True,
                                prompt_logprobs=True, context_length=1000)

    def __init__(self, model: str = "gpt-4o-mini", fail: int = 0,
                 error: Exception | None = None, delay: float = 0.0):
        self.model, self.fail, self.error, self.delay = model, fail, error, delay
        self.calls: list = []
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    def identity(self) -> dict:
        return {"backend": "fake", "model": self.model}

    def _enter(self, what) -> None:
        with self._lock:
            self.calls.append(what)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            failing = self.fail > 0
            self.fail -= failing
        try:
            if self.delay:
                time.sleep(self.delay)
            if failing:
                raise self.error or TransientError("busy")
        finally:
            with self._lock:
                self.active -= 1

    def generate(self, request: GenerateRequest) -> Generation:
        self._enter(request)
        text = f"{request.messages[-1].content}/{request.temperature}/{request.seed}"
        logprobs = (TokenLogprob("a", -0.5, (("a", -0.5), ("b", -1.25))),
                    TokenLogprob("\t", -math.inf, ()))
        return Generation((Completion(text, logprobs, "length"), Completion("two")),
                          Usage(1000, 100))

    def prompt_logprobs(self, requests: Sequence[PromptLogprobRequest]) -> list[TokenDistributions]:
        self._enter(tuple(requests))
        return [TokenDistributions(((0.25, 0.75),) * len(r.positions), (0.5,) * len(r.positions),
                                   Usage(len(r.prompt), 0)) for r in requests]


def chat(text: str = "hi", **kw) -> GenerateRequest:
    return GenerateRequest(messages=(Message("user", text),), **kw)


def scoring(prompt: str) -> PromptLogprobRequest:
    return PromptLogprobRequest(prompt, (0, 1), ("0", "1"))


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Backoff made instant; the waits asked for are recorded. Jitter at its maximum."""
    waits: list[float] = []
    monkeypatch.setattr(policy, "sleep", waits.append)
    monkeypatch.setattr(policy, "jitter", lambda: 1.0)
    return waits


# ---- retries ----------------------------------------------------------------------------------
def test_retries_then_succeeds(sleeps):
    fake = Fake(fail=2)
    out = Policy(fake, base_delay=0.5).generate(chat())
    assert out.completions[0].text == "hi/0.0/0"
    assert len(fake.calls) == 3 and sleeps == [0.5, 1.0]


def test_backoff_grows_exponentially_capped_and_honours_retry_after(sleeps):
    fake = Fake(fail=6, error=TransientError("429", retry_after=1.5))
    p = Policy(fake, max_retries=6, base_delay=0.5, max_delay=4.0)
    p.generate(chat())
    assert sleeps == [1.5, 1.5, 2.0, 4.0, 4.0, 4.0]
    assert all(w >= 1.5 for w in sleeps)
    s = p.stats()
    assert (s["requests"], s["retries"], s["transient_errors"]) == (7, 6, 6)


def test_retry_after_is_capped_by_max_delay(sleeps):
    Policy(Fake(fail=1, error=TransientError("429", retry_after=100.0)), max_delay=3.0).generate(chat())
    assert sleeps == [3.0]


def test_full_jitter_stays_inside_the_window(monkeypatch):
    monkeypatch.setattr(policy, "jitter", lambda: 0.25)
    assert policy.backoff(3, 0.5, 30.0, None) == 0.25 * 4.0
    assert policy.backoff(3, 0.5, 30.0, 2.5) == 2.5
    assert policy.backoff(20, 0.5, 30.0, None) == 30.0


def test_backend_error_is_not_retried(sleeps):
    fake = Fake(fail=1, error=BackendError("bad key"))
    p = Policy(fake)
    with pytest.raises(BackendError, match="bad key"):
        p.generate(chat())
    assert len(fake.calls) == 1 and sleeps == []
    assert p.stats()["retries"] == 0


def test_gives_up_after_max_retries(sleeps):
    fake = Fake(fail=100)
    p = Policy(fake, max_retries=3)
    with pytest.raises(TransientError, match="busy"):
        p.generate(chat())
    assert len(fake.calls) == 4 and len(sleeps) == 3
    assert p.stats()["transient_errors"] == 4 and p.stats()["retries"] == 3


# ---- the cache --------------------------------------------------------------------------------
def test_a_second_identical_call_is_served_from_the_cache(tmp_path):
    fake = Fake()
    p = Policy(fake, cache_dir=tmp_path)
    first = p.generate(chat(top_logprobs=2))
    second = p.generate(chat(top_logprobs=2))
    assert second == first and len(fake.calls) == 1
    assert second.completions[0].logprobs[1].logprob == -math.inf   # JSON keeps -inf
    again = Policy(Fake(), cache_dir=tmp_path)
    assert again.generate(chat(top_logprobs=2)) == first
    assert again.backend.calls == [] and again.stats()["cache_hits"] == 1
    assert (tmp_path / "responses.sqlite").is_file()


def test_no_cache_dir_means_no_cache(tmp_path):
    fake = Fake()
    p = Policy(fake)
    p.generate(chat())
    p.generate(chat())
    assert len(fake.calls) == 2 and p.stats()["cache_hits"] == 0


def test_cache_rows_are_json(tmp_path):
    Policy(Fake(), cache_dir=tmp_path).generate(chat())
    with sqlite3.connect(tmp_path / "responses.sqlite") as db:
        (op, value), = db.execute("SELECT op, value FROM responses").fetchall()
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert op == "generate" and value.startswith("{") and '"completions"' in value
    assert mode == "wal"


def test_key_holds_what_changes_the_output_and_nothing_else():
    ident = Fake().identity()
    base = cache_key("generate", ident, chat())
    assert cache_key("generate", dict(ident), chat()) == base
    different = [
        cache_key("generate", ident, chat(temperature=1.0)),
        cache_key("generate", ident, chat(seed=1)),
        cache_key("generate", ident, chat(top_logprobs=5)),
        cache_key("generate", ident, chat(n=2)),
        cache_key("generate", ident, chat(stop=("\n",))),
        cache_key("generate", ident, chat("other")),
        cache_key("generate", Fake("gpt-4o").identity(), chat()),
        cache_key("generate", ident | {"api_base": "http://x/v1"}, chat()),
        cache_key("prompt_logprobs", ident, chat()),
    ]
    assert len(set(different + [base])) == len(different) + 1


def test_timeouts_and_retries_do_not_change_the_key(tmp_path):
    from neuronlens.backends.litellm import LiteLLMBackend

    a = LiteLLMBackend("openai/m", api_base="http://h/v1", timeout=5.0)
    b = LiteLLMBackend("openai/m", api_base="http://h/v1", timeout=600.0)
    assert cache_key("generate", a.identity(), chat()) == cache_key("generate", b.identity(), chat())
    fake = Fake()
    Policy(fake, cache_dir=tmp_path, max_retries=1, base_delay=0.1).generate(chat())
    Policy(fake, cache_dir=tmp_path, max_retries=9, base_delay=2.0).generate(chat())
    assert len(fake.calls) == 1


def test_sampled_outputs_are_cached_per_seed(tmp_path):
    fake = Fake()
    p = Policy(fake, cache_dir=tmp_path)
    a = p.generate(chat(temperature=1.0, seed=1))
    b = p.generate(chat(temperature=1.0, seed=2))
    assert a != b and p.generate(chat(temperature=1.0, seed=1)) == a
    assert len(fake.calls) == 2


def test_prompt_logprobs_sends_only_the_misses_one_by_one(tmp_path):
    fake = Fake()
    p = Policy(fake, cache_dir=tmp_path)
    first = p.prompt_logprobs([scoring("a"), scoring("bb")])
    out = p.prompt_logprobs([scoring("bb"), scoring("ccc"), scoring("a"), scoring("dddd")])
    assert sorted(fake.calls[2:], key=str) == [(scoring("ccc"),), (scoring("dddd"),)]
    assert out[0] == first[1] and out[2] == first[0]
    assert [d.usage.prompt_tokens for d in out] == [2, 3, 1, 4]
    assert p.prompt_logprobs([scoring("a"), scoring("ccc")]) == [out[2], out[1]]
    assert len(fake.calls) == 4
    s = p.stats()
    assert s["cache_hits"] == 4 and s["prompt_tokens"] == 1 + 2 + 3 + 4


def test_a_prompt_that_keeps_failing_costs_only_itself(tmp_path):
    class FailsOnB(Fake):
        def prompt_logprobs(self, requests):
            if requests[0].prompt == "bb":
                raise TransientError("503 unavailable")
            return super().prompt_logprobs(requests)

    p = Policy(FailsOnB(), cache_dir=tmp_path, max_retries=2)
    a, b = p.prompt_logprobs([scoring("a"), scoring("bb")])
    assert a.error is None and a.probs
    assert b.error == "503 unavailable" and b.probs == ()
    assert p.stats()["retries"] == 2
    assert p.prompt_logprobs([scoring("bb")])[0].error  # a failure is never cached


def test_eight_threads_share_one_cache(tmp_path):
    """Two policies (as two processes would) on one directory, eight threads writing at once."""
    fakes = [Fake(delay=0.005), Fake(delay=0.005)]
    policies = [Policy(f, cache_dir=tmp_path, concurrency=8) for f in fakes]
    jobs = [(policies[i % 2], f"q{i % 20}") for i in range(200)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        outs = list(pool.map(lambda job: job[0].generate(chat(job[1])), jobs))
    assert [o.completions[0].text for o in outs] == [f"{q}/0.0/0" for _, q in jobs]
    assert sum(len(f.calls) for f in fakes) <= 200
    fresh = Policy(Fake(), cache_dir=tmp_path)
    for i in range(20):
        assert fresh.generate(chat(f"q{i}")).completions[0].text == f"q{i}/0.0/0"
    assert fresh.backend.calls == []


def _write_in_a_process(directory: str, start: int) -> list[str]:
    p = Policy(Fake(), cache_dir=directory)
    return [p.generate(chat(f"p{i}")).completions[0].text for i in range(start, start + 30)]


def test_two_processes_write_one_cache(tmp_path):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_write_in_a_process, [(str(tmp_path), 0), (str(tmp_path), 15)])
    assert results[0][15:] == results[1][:15]
    fresh = Policy(Fake(), cache_dir=tmp_path)
    texts = [fresh.generate(chat(f"p{i}")).completions[0].text for i in range(45)]
    assert texts == [f"p{i}/0.0/0" for i in range(45)] and fresh.backend.calls == []


def _open_at(directory: str, when: float) -> None:
    while time.time() < when:   # every process opens the cache at the same moment
        pass
    cache = ResponseCache(directory)
    cache.put(f"k{os.getpid()}", "op", {"a": 1})
    cache.close()


def test_processes_opening_one_new_cache_at_once(tmp_path):
    """Six processes creating one cache together, ten times: none is refused ("database is
    locked" came from the switch to WAL, which SQLite does not wait for)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(6) as pool:
        for trial in range(10):
            directory = str(tmp_path / str(trial))
            pool.starmap(_open_at, [(directory, time.time() + 0.2)] * 6)
            assert ResponseCache(directory)._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 6


# ---- concurrency ------------------------------------------------------------------------------
def test_concurrency_is_bounded():
    fake = Fake(delay=0.02)
    p = Policy(fake, concurrency=3)
    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(lambda i: p.generate(chat(str(i))), range(24)))
    assert fake.max_active == 3 and len(fake.calls) == 24


def test_roles_on_one_server_share_its_concurrency(monkeypatch):
    """An explainer and a simulator on one address send at most ``concurrency`` requests between
    them (the pipeline's gates), while a role on another server keeps a budget of its own."""
    from neuronlens.backends.policy import gate_for

    active = {"n": 0, "max": 0}
    lock = threading.Lock()

    class OnServer(Fake):
        def __init__(self, url: str):
            super().__init__(delay=0.02)
            self.url = url

        def identity(self) -> dict:
            return super().identity() | {"base_url": self.url}

        def _enter(self, what) -> None:
            if self.url.startswith("http://shared"):
                with lock:
                    active["n"] += 1
                    active["max"] = max(active["max"], active["n"])
            super()._enter(what)
            if self.url.startswith("http://shared"):
                with lock:
                    active["n"] -= 1

    gates: dict = {}
    roles = [OnServer(u) for u in ("http://shared:8000/v1", "http://shared:8000/v1/", "http://other/v1")]
    policies = [Policy(b, concurrency=3, gate=gate_for(b, 3, gates)) for b in roles]
    assert policies[0].gate is policies[1].gate is not policies[2].gate
    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(lambda i: policies[i % 3].generate(chat(str(i))), range(48)))
    assert active["max"] == 3   # not 6: the two roles on the shared server split its budget
    assert roles[2].max_active == 3 and all(len(b.calls) == 16 for b in roles)


def test_a_busy_server_gets_fewer_requests_in_flight_then_more_again(sleeps):
    """Timeouts and 429/503 halve the requests in flight; each success adds back 1/limit."""
    fake = Fake(fail=3, error=TransientError("timed out", kind="timeout"))
    p = Policy(fake, concurrency=8, max_retries=6)
    p.generate(chat())
    assert p.limit == pytest.approx(1.0 + 1.0)   # 8 -> 4 -> 2 -> 1, then one success: 1 + 1/1
    for i in range(40):
        p.generate(chat(str(i)))
    assert p.limit == 8.0


def test_an_unparseable_answer_does_not_shrink_concurrency(sleeps):
    p = Policy(Fake(fail=2, error=TransientError("bad json", kind="unparseable")), concurrency=8)
    p.generate(chat())
    assert p.limit == 8.0


def test_busy_limit_bounds_threads_for_real():
    """Under a timeout storm the limit really holds: never more in flight than it allows."""
    fake = Fake(fail=4, error=TransientError("timed out", kind="timeout"), delay=0.01)
    p = Policy(fake, concurrency=4, base_delay=0.0)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: p.generate(chat(str(i))), range(8)))
    assert fake.max_active <= 4 and p.stats()["retries"] == 4


def test_the_retry_budget_stops_a_storm(sleeps):
    """Past 10 retries + 20% of the requests, a transient failure fails at once, said so and
    counted by its kind."""
    fake = Fake(fail=10_000, error=TransientError("overloaded", kind="overloaded"))
    p = Policy(fake, max_retries=6, retry_budget=0.2)
    failed = 0
    for i in range(10):
        with pytest.raises(TransientError) as e:
            p.generate(chat(str(i)))
        failed += "retry budget" in str(e.value)
        assert e.value.kind == "overloaded"
    s = p.stats()
    assert s["retries"] <= 10 + 0.2 * s["requests"] + 1
    assert s["requests"] < 10 * 7 / 2 and failed >= 5
    assert s["failures"] == {"overloaded": 10}


@pytest.mark.parametrize("kind", ["timeout", "unreachable"])
def test_a_server_that_never_answers_stops_the_run(sleeps, kind):
    """No request answered and one given up on for lack of an answer: a BackendError (one line,
    the run stops) after the retries, with the waits bounded by the policy's settings."""
    p = Policy(Fake(fail=10_000, error=TransientError("no answer", kind=kind)), max_retries=3)
    with pytest.raises(BackendError, match="has stopped answering: 1 requests in a row"):
        p.generate(chat("a"))
    assert p.stats()["requests"] == 4 and len(sleeps) == 3 and sum(sleeps) <= 0.5 * (1 + 2 + 4)


def test_after_answers_it_takes_a_streak_to_stop_the_run(sleeps):
    from neuronlens.backends.policy import DOWN_AFTER

    fake = Fake(fail=0)
    p = Policy(fake, max_retries=0)
    p.generate(chat("ok"))
    fake.fail, fake.error = 10_000, TransientError("no answer", kind="timeout")
    for i in range(DOWN_AFTER - 1):
        with pytest.raises(TransientError):
            p.generate(chat(str(i)))
    with pytest.raises(BackendError, match=f"{DOWN_AFTER} requests in a row"):
        p.generate(chat("last"))


def test_failed_prompts_are_counted_by_kind(tmp_path):
    from neuronlens.backends.base import Unscorable

    class Misaligned(Fake):
        def prompt_logprobs(self, requests):
            raise Unscorable("ids differ", kind="misaligned")

    p = Policy(Misaligned(), max_retries=3)
    out = p.prompt_logprobs([scoring("a"), scoring("b")])
    assert [d.kind for d in out] == ["misaligned", "misaligned"]
    assert p.stats()["failures"] == {"misaligned": 2} and p.stats()["retries"] == 0


# ---- accounting -------------------------------------------------------------------------------
def test_tokens_and_cost_of_a_known_model(tmp_path):
    import litellm

    p = Policy(Fake("gpt-4o-mini"), cache_dir=tmp_path)
    p.generate(chat("a"))
    p.generate(chat("b"))
    p.generate(chat("a"))     # cached: costs nothing
    s = p.stats()
    assert s["requests"] == 2 and s["cache_hits"] == 1
    assert (s["prompt_tokens"], s["completion_tokens"]) == (2000, 200)
    one = sum(litellm.cost_per_token(model="gpt-4o-mini", prompt_tokens=1000, completion_tokens=100))
    assert s["cost_known"] is True and s["cost_usd"] == pytest.approx(2 * one) and one > 0
    p.generate(chat("c"))
    assert p.stats()["cost_usd"] == pytest.approx(3 * one)


def test_an_unknown_model_has_no_cost():
    p = Policy(Fake("no-such-provider/no-such-model-xyz"))
    p.generate(chat())
    s = p.stats()
    assert s["cost_usd"] is None and s["cost_known"] is False
    assert s["prompt_tokens"] == 1000


def test_a_self_hosted_endpoint_has_no_price_even_under_a_priced_name():
    from neuronlens.backends.prices import priced_model

    assert priced_model({"model": "gpt-4o", "base_url": None}) == "gpt-4o"
    assert priced_model({"model": "gpt-4o", "base_url": "https://api.openai.com/v1"}) == "gpt-4o"
    assert priced_model({"model": "gpt-4o", "base_url": "http://127.0.0.1:8000/v1"}) is None
    assert priced_model({"model": "openai/gpt-4o", "api_base": "http://gpu:8000/v1"}) is None


def test_stats_keys_and_a_fresh_policy():
    s = Policy(Fake()).stats()
    assert s == {"requests": 0, "cache_hits": 0, "evicted": 0, "retries": 0, "transient_errors": 0,
                 "prompt_tokens": 0, "completion_tokens": 0, "failures": {}, "cost_usd": 0.0,
                 "cost_known": True}


# ---- delegation and encoding ------------------------------------------------------------------
def test_delegates_to_the_backend():
    fake = Fake("m")
    p = Policy(fake)
    assert p.capabilities == fake.capabilities and p.name == "Fake"
    assert p.identity() == {"backend": "fake", "model": "m"}
    assert p.count_tokens("abcdefgh") == 2


def test_json_round_trips():
    g = Generation((Completion("x", (TokenLogprob("x", -0.1, (("x", -0.1), ("y", -2.0))),)),
                    Completion("y", None, "length")), Usage(3, 4))
    assert policy.generation_from_json(policy.generation_to_json(g)) == g
    d = TokenDistributions(((0.1, 0.9),), (0.8,), Usage(5, 0))
    assert policy.distributions_from_json(policy.distributions_to_json(d)) == d
    assert dataclasses.asdict(g)["completions"][1]["logprobs"] is None


# ---- only usable answers are cached -----------------------------------------------------------
def test_an_unusable_answer_is_never_cached_and_a_cached_one_is_evicted(tmp_path):
    fake = Fake()
    p = Policy(fake, cache_dir=tmp_path)
    usable = {"now": False}
    p.generate_usable(chat("x"), lambda g: usable["now"])
    p.generate_usable(chat("x"), lambda g: usable["now"])
    assert len(fake.calls) == 2 and p.stats()["cache_hits"] == 0   # asked again, not replayed
    usable["now"] = True
    p.generate_usable(chat("x"), lambda g: True)
    p.generate_usable(chat("x"), lambda g: True)
    assert len(fake.calls) == 3 and p.stats()["cache_hits"] == 1
    # the stored answer turns out unusable (a stricter parser): evicted and asked again
    p.generate_usable(chat("x"), lambda g: len(fake.calls) > 3)
    assert len(fake.calls) == 4 and p.stats()["evicted"] == 1


def test_prompt_scores_of_the_wrong_shape_fail_their_excerpt_and_are_not_cached(tmp_path):
    class Short(Fake):
        def prompt_logprobs(self, requests):
            self._enter(tuple(requests))
            return [TokenDistributions(((0.25, 0.75),), (0.5,), Usage(7, 0)) for r in requests]

    backend = Short()
    p = Policy(backend, cache_dir=tmp_path)
    for _ in range(2):
        out = p.prompt_logprobs([scoring("a")])
        assert out[0].kind == "wrong_length" and "1 distributions for 2 placeholders" in out[0].error
    assert len(backend.calls) == 2
    s = p.stats()
    assert s["failures"] == {"wrong_length": 2} and s["prompt_tokens"] == 14   # still counted


def test_an_answer_that_failed_to_score_still_counts_its_tokens():
    from neuronlens.backends.base import Unscorable

    class Misaligned(Fake):
        def prompt_logprobs(self, requests):
            e = Unscorable("ids differ", kind="misaligned")
            e.usage = Usage(123, 1)
            raise e

    p = Policy(Misaligned())
    out = p.prompt_logprobs([scoring("a")])
    assert out[0].usage == Usage(123, 1)
    assert p.stats()["prompt_tokens"] == 123 and p.stats()["requests"] == 1


def test_a_slow_server_is_never_silent(monkeypatch, caplog):
    monkeypatch.setattr(policy, "HEARTBEAT", 0.05)
    p = Policy(Fake(delay=0.4))
    with caplog.at_level("WARNING"):
        p.generate(chat("slow"))
    assert "Fake: waiting for 1 requests, none answered for" in caplog.text
