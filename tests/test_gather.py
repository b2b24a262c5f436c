"""``Gather``: the requests of many threads run together, one engine call at a time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from neuronlens.backends.gather import Gather


class Engine:
    """A stand-in for vLLM's ``LLM.generate``: doubles each item, takes a while, and notes each
    call's items and how many calls ran at once; an item "bad" makes the whole call raise, as a
    prompt vLLM refuses does."""

    def __init__(self):
        self.calls: list[list] = []
        self.inside = self.most_inside = 0
        self.lock = threading.Lock()

    def __call__(self, items: list) -> list:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.calls.append(list(items))
        time.sleep(0.5 if "slow" in items else 0.05)
        with self.lock:
            self.inside -= 1
        if "bad" in items:
            raise ValueError("a prompt the engine refuses")
        return [x if isinstance(x, str) else 2 * x for x in items]


def test_many_threads_requests_run_together_one_call_at_a_time_each_given_its_own():
    engine = Engine()
    gather = Gather(engine)
    asks = [list(range(10 * i, 10 * i + 1 + i % 3)) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(gather, asks))
    assert got == [[2 * x for x in ask] for ask in asks]   # each caller its own, in order
    assert engine.most_inside == 1                           # one engine call at a time
    assert gather.runs == len(engine.calls) < len(asks)      # callers gathered
    assert max(len(c) for c in engine.calls) > max(len(a) for a in asks)
    assert sorted(x for c in engine.calls for x in c) == sorted(x for a in asks for x in a)   # each once
    assert gather([]) == [] and gather.runs == len(engine.calls)   # nothing asked: no call


def test_a_refused_request_fails_its_own_caller_alone():
    """Four callers wait behind a slow call and go to the engine together; that call raises, so
    each caller's requests run again alone: only the refused one's caller gets the error."""
    engine = Engine()
    gather = Gather(engine)
    asks = [[1, 2], ["bad"], [3], [4, 5]]

    def ask(items):
        try:
            return gather(items)
        except ValueError as e:
            return str(e)

    with ThreadPoolExecutor(len(asks) + 1) as pool:
        slow = pool.submit(gather, ["slow"])
        time.sleep(0.2)   # the slow call is running: the four wait, then go together
        got = list(pool.map(ask, asks))
    assert slow.result() == ["slow"]
    assert got == [[2, 4], "a prompt the engine refuses", [6], [8, 10]]
    assert sorted(map(str, engine.calls[1])) == sorted(map(str, [1, 2, "bad", 3, 4, 5]))   # together
    assert sorted(engine.calls[2:], key=str) == sorted(asks, key=str)                    # then alone
    with pytest.raises(RuntimeError, match="answered 1 of 2 requests"):
        Gather(lambda items: items[:1])([1, 2])


def test_callers_waiting_on_an_interrupted_call_are_told_so():
    """A call interrupted inside the engine (Ctrl-C in the thread running it) leaves no caller
    empty-handed: the interrupt reaches that thread, and the other caller is told so."""
    class Interrupted(BaseException):
        pass

    def engine(items):
        time.sleep(0.3)
        if "interrupt" in items:
            raise Interrupted
        return items

    gather = Gather(engine)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(gather, ["slow"])
        time.sleep(0.1)
        both = [pool.submit(gather, ["interrupt"]), pool.submit(gather, [1])]   # wait, then go together
        assert first.result() == ["slow"]
        errors = [f.exception() for f in both]
    # whichever thread ran the call was interrupted; the other is told so
    assert sorted(type(e).__name__ for e in errors) == ["Interrupted", "RuntimeError"]
    assert any("interrupted" in str(e) for e in errors if isinstance(e, RuntimeError))
