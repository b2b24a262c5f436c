"""Calls from many threads gathered into one batch, for an engine that takes one caller at a time
and is fastest on a large batch (vLLM's in-process ``LLM``: two threads in ``generate`` at once
break its engine core; the local backend's scoring and generation)."""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence


class _Call:
    def __init__(self, items: list):
        self.items, self.results, self.error, self.done = items, None, None, False

    def result(self) -> list:
        if self.error is not None:
            raise self.error
        return self.results


class Gather:
    """``gather(items)`` returns ``run(items)``; while one run is going, the items other threads
    bring wait, and the first of them to find the engine free runs everything waiting in one call
    (each caller's items in order) and hands each caller its own results. One run at a time.

    A run that raises is retried caller by caller, so a bad item fails its own caller alone.
    ``runs`` counts the calls to ``run``."""

    def __init__(self, run: Callable[[list], Sequence[Any]]):
        self._run, self._free = run, threading.Condition()
        self._waiting: list[_Call] = []
        self._busy = False
        self.runs = 0

    def __call__(self, items: Sequence[Any]) -> list:
        call = _Call(list(items))
        with self._free:
            self._waiting.append(call)
            while self._busy and not call.done:
                self._free.wait()
            if call.done:   # run by another caller
                return call.result()
            self._busy = True
            batch, self._waiting = self._waiting, []
        try:
            self._run_batch(batch)
        finally:
            with self._free:
                for c in batch:
                    if c.results is None and c.error is None:   # the run was interrupted
                        c.error = RuntimeError("the engine call these requests were in was interrupted")
                    c.done = True
                self._busy = False
                self._free.notify_all()
        return call.result()

    def _run_batch(self, batch: list[_Call]) -> None:
        try:
            results = self._checked([x for c in batch for x in c.items])
        except Exception as e:   # noqa: BLE001 - handed to the callers, each alone if there are several
            if len(batch) == 1:
                batch[0].error = e
                return
            for c in batch:
                try:
                    c.results = self._checked(c.items)
                except Exception as alone:   # noqa: BLE001
                    c.error = alone
            return
        start = 0
        for c in batch:
            c.results, start = results[start:start + len(c.items)], start + len(c.items)

    def _checked(self, items: list) -> list:
        if not items:
            return []
        self.runs += 1
        results = list(self._run(items))
        if len(results) != len(items):
            raise RuntimeError(f"an engine call answered {len(results)} of {len(items)} requests")
        return results
