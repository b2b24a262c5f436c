"""The engine's policy around any backend: response cache, retries, bounded concurrency, and
token and dollar accounting. Backends only translate (STYLE lesson 1); this is the one place that
retries a `TransientError`, waits, caches and counts.

Cache: SQLite at ``cache_dir/responses.sqlite`` (WAL, so several multirun processes can share
it), one row per response, keyed by the sha256 of the canonical JSON of the operation, the
backend's ``identity()`` and the request's fields: everything that changes the output and nothing
that doesn't (timeouts and retries are not part of a request). Values are JSON, never pickle.
Sampled outputs are cached too: the seed is a field of the request, hence of the key.

No retry storms: a self-hosted server (vLLM) queues what it cannot compute yet, so a timeout or
a 429/503 means it is busy, and sending more would only lengthen its queue. The policy then
halves the requests kept in flight to that server, by every role of the run that uses it (down to
1), and raises the limit back by one each time
``limit`` requests have come back well (AIMD, as TCP does). Retries have a budget per run: at most
``retry_budget`` times the requests made so far (plus a floor of 10); past it a transient
failure fails its request at once, counted under its kind, instead of being sent again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import random
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from neuronlens.backends.prices import price, priced_model
from neuronlens.backends.base import (
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
    failure_kind,
)

log = logging.getLogger(__name__)
CACHE_VERSION = 1          # part of every key: bump when the stored encoding changes
sleep: Callable[[float], None] = time.sleep   # tests replace these two to make backoff instant
jitter: Callable[[], float] = random.random   # uniform in [0, 1)

T = TypeVar("T")
# A request given up on (after every retry) for one of these kinds means the server did not answer
# at all. If none has been answered yet, the first such request stops the run; after that,
# DOWN_AFTER of them in a row do.
DOWN = ("unreachable", "timeout")
DOWN_AFTER = 8
HEARTBEAT = 30.0   # seconds without any answer before a waiting line is logged


# ---- JSON encoding of results -----------------------------------------------------------------
def generation_to_json(g: Generation) -> dict:
    return dataclasses.asdict(g)


def generation_from_json(d: dict) -> Generation:
    def logprob(t: dict) -> TokenLogprob:
        return TokenLogprob(t["token"], float(t["logprob"]),
                            tuple((str(a), float(b)) for a, b in t["top"]))

    completions = tuple(
        Completion(c["text"], None if c["logprobs"] is None else tuple(logprob(t) for t in c["logprobs"]),
                   c["finish_reason"])
        for c in d["completions"])
    return Generation(completions, Usage(**d["usage"]))


def distributions_to_json(t: TokenDistributions) -> dict:
    return dataclasses.asdict(t)


def distributions_from_json(d: dict) -> TokenDistributions:
    return TokenDistributions(tuple(tuple(float(p) for p in row) for row in d["probs"]),
                              tuple(float(m) for m in d["mass"]), Usage(**d["usage"]),
                              bound=tuple(float(b) for b in d.get("bound", ())))


def shape_error(d: TokenDistributions, request: PromptLogprobRequest) -> str | None:
    """Why ``d`` cannot be the answer to ``request`` (one distribution over the candidates per
    placeholder), or None."""
    if d.error is not None:
        return d.error
    if len(d.probs) != len(request.positions) or len(d.mass) != len(d.probs):
        return f"{len(d.probs)} distributions for {len(request.positions)} placeholders"
    if any(len(row) != len(request.candidates) for row in d.probs):
        return f"distributions over other than the {len(request.candidates)} candidates"
    return None


def cache_key(op: str, identity: dict, request: Any) -> str:
    """sha256 of the canonical JSON of what determines the answer."""
    payload = {"op": op, "backend": identity, "request": dataclasses.asdict(request),
               "version": CACHE_VERSION}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def backoff(attempt: int, base_delay: float, max_delay: float, retry_after: float | None) -> float:
    """Seconds to wait before retry ``attempt`` (0 first): full jitter over an exponentially
    growing window, at least what the server asked for, never more than ``max_delay``."""
    wait = jitter() * base_delay * 2 ** attempt
    if retry_after is not None:
        wait = max(wait, retry_after)
    return min(wait, max_delay)


# ---- the on-disk cache ------------------------------------------------------------------------
class ResponseCache:
    """Key -> JSON text in SQLite; one connection behind a lock in this process, WAL between
    processes."""

    def __init__(self, directory: str | Path):
        path = Path(directory).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "responses.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 60000")
        # Switching to WAL takes an exclusive lock that SQLite does not wait for: processes that
        # open one cache at the same moment take turns here (a sidecar flock) instead.
        with open(path / "responses.sqlite.setup", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, "
                             "op TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)")

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def delete(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM responses WHERE key = ?", (key,))

    def put(self, key: str, op: str, value: dict) -> None:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses (key, op, value, created) "
                             "VALUES (?, ?, ?, ?)", (key, op, text, time.time()))

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---- requests in flight to one server ---------------------------------------------------------
class Gate:
    """The requests in flight to one server, and how many it may have (AIMD, see the module doc).
    The roles of a run that talk to one address share its gate (`gate_for`): an explainer and a
    simulator on one vLLM send at most ``remote.concurrency`` requests between them."""

    def __init__(self, concurrency: int, name: str = "the server"):
        self.concurrency, self.name = concurrency, name
        self.limit = float(concurrency)   # requests allowed in flight now
        self.in_flight = 0
        self.last_news = time.monotonic()   # when a request last came back (or the first went out)
        self.free = threading.Condition()

    def acquire(self) -> None:
        with self.free:
            while self.in_flight >= max(1, int(self.limit)):
                self.free.wait()
            self.in_flight += 1
            if self.in_flight == 1:
                self.last_news = time.monotonic()

    def release(self, busy: bool, ok: bool) -> None:
        with self.free:
            self.in_flight -= 1
            self.last_news = time.monotonic()
            if busy and self.limit > 1:
                self.limit = max(1.0, self.limit / 2)
                log.warning("%s is busy: at most %d requests in flight from now on.", self.name,
                            int(self.limit))
            if ok and not busy and self.limit < self.concurrency:
                self.limit = min(float(self.concurrency), self.limit + 1 / self.limit)
            self.free.notify_all()


def gate_for(backend: Backend, concurrency: int, gates: dict[str, Gate]) -> Gate:
    """The gate in ``gates`` (one run's) of the server ``backend`` talks to, keyed by its address
    (``base_url`` or ``api_base``; a backend without one gets a gate of its own). Roles sharing an
    address share the smaller of their budgets."""
    identity = backend.identity()
    address = identity.get("base_url") or identity.get("api_base")
    if not address:
        return Gate(concurrency, backend.name)
    key = str(address).rstrip("/")
    gate = gates.get(key)
    if gate is None:
        gate = gates[key] = Gate(concurrency, key)
    elif concurrency < gate.concurrency:
        gate.concurrency, gate.limit = concurrency, min(gate.limit, float(concurrency))
    return gate


# ---- the policy -------------------------------------------------------------------------------
class Policy(Backend):
    """Wraps ``backend``: cache first, then the backend under a bounded semaphore (``gate``, which
    roles on one server share), retrying `TransientError` up to ``max_retries`` times;
    `BackendError` passes through at once."""

    def __init__(self, backend: Backend, cache_dir: str | Path | None = None, max_retries: int = 6,
                 base_delay: float = 0.5, max_delay: float = 30.0, concurrency: int = 8,
                 retry_budget: float = 0.2, gate: Gate | None = None):
        if max_retries < 0 or concurrency < 1 or base_delay < 0 or max_delay < 0 or retry_budget < 0:
            raise ValueError("max_retries, base_delay, max_delay and retry_budget must be 0 or more "
                             "and concurrency at least 1.")
        self.backend = backend
        self.max_retries, self.base_delay, self.max_delay = max_retries, base_delay, max_delay
        self.retry_budget = retry_budget
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None
        self.concurrency = concurrency
        self.gate = gate or Gate(concurrency, backend.name)   # shared by the roles on one server
        self._in_flight = 0      # this role's requests in flight
        self._answered = 0       # requests answered well, ever
        self._watch: threading.Thread | None = None
        self._down_streak = 0    # requests given up on in a row because the server did not answer
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("requests", "cache_hits", "evicted", "retries", "transient_errors",
                                      "prompt_tokens", "completion_tokens"), 0)
        self._failures: Counter[str] = Counter()   # requests given up on, by kind
        self._unpriced: list[tuple[int, int]] = []   # fresh responses' tokens, priced in stats()
        self._cost: float | None = 0.0

    # ---- delegation ---------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.backend.capabilities

    @property
    def name(self) -> str:
        return self.backend.name

    def identity(self) -> dict:
        return self.backend.identity()

    def count_tokens(self, text: str) -> int:
        return self.backend.count_tokens(text)

    def load(self) -> None:
        self.backend.load()

    # ---- the two operations -------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> Generation:
        return self.generate_usable(request, lambda g: True)

    def generate_usable(self, request: GenerateRequest,
                        usable: Callable[[Generation], bool]) -> Generation:
        """Only a usable answer is cached; a cached one that is not is evicted and asked again."""
        key = cache_key("generate", self.identity(), request) if self.cache else None
        if key is not None and (hit := self.cache.get(key)) is not None:
            cached = generation_from_json(hit)
            if usable(cached):
                self._add(cache_hits=1)
                return cached
            self.cache.delete(key)
            self._add(evicted=1)
            log.warning("%s: evicted a cached answer that could not be used; asking again.", self.name)
        try:
            result = self._call(lambda: self.backend.generate(request))
        except (TransientError, Unscorable) as e:
            self._fail(e)
            raise
        self._account(result.usage)
        if key is not None and usable(result):
            self.cache.put(key, "generate", generation_to_json(result))
        return result

    def prompt_logprobs(self, requests: Sequence[PromptLogprobRequest]) -> list[TokenDistributions]:
        identity = self.identity() if self.cache else None
        keys = [cache_key("prompt_logprobs", identity, r) if self.cache else None for r in requests]
        results: list[TokenDistributions | None] = [None] * len(requests)
        for i, key in enumerate(keys):
            if key is not None and (hit := self.cache.get(key)) is not None:
                cached = distributions_from_json(hit)
                if shape_error(cached, requests[i]) is None:
                    results[i] = cached
                else:
                    self.cache.delete(key)
                    self._add(evicted=1)
        self._add(cache_hits=sum(r is not None for r in results))
        misses = [i for i, r in enumerate(results) if r is None]

        def one(i: int) -> TokenDistributions:
            """Each prompt is its own request, retried alone: one bad answer costs one excerpt."""
            try:
                fresh = self._call(lambda: self.backend.prompt_logprobs([requests[i]]))
            except (TransientError, Unscorable) as e:
                self._fail(e)
                return TokenDistributions((), (), getattr(e, "usage", None) or Usage(), error=str(e),
                                          kind=failure_kind(e))
            if len(fresh) != 1:
                raise BackendError(f"The {self.name} backend answered {len(fresh)} prompts for 1.")
            self._account(fresh[0].usage)
            if fresh[0].error is None and (wrong := shape_error(fresh[0], requests[i])):
                fresh[0] = dataclasses.replace(fresh[0], error=wrong, kind="wrong_length")
            if fresh[0].error is not None:   # the backend failed it alone: count it, never cache it
                self._count_failure(fresh[0].kind or "unscorable")
                return fresh[0]
            if keys[i] is not None:
                self.cache.put(keys[i], "prompt_logprobs", distributions_to_json(fresh[0]))
            return fresh[0]

        with ThreadPoolExecutor(max_workers=max(1, min(len(misses), self.concurrency))) as pool:
            for i, dist in zip(misses, pool.map(one, misses)):
                results[i] = dist
        return results  # type: ignore[return-value]

    def _call(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.max_retries + 1):
            self._acquire()
            try:
                result = fn()
            except TransientError as e:
                self._release(busy=e.kind in TransientError.BUSY)
                with self._lock:
                    self._counts["transient_errors"] += 1
                    spent = self._counts["retries"] >= 10 + self.retry_budget * self._counts["requests"]
                    if attempt == self.max_retries or spent:
                        final = TransientError(f"{e}{' (the run spent its retry budget)' if spent else ''}",
                                               e.retry_after, e.kind)
                        final.usage = getattr(e, "usage", None)
                        raise final from e
                    self._counts["retries"] += 1
                    retries = self._counts["retries"]
                self._account(getattr(e, "usage", None) or Usage())   # an answer that failed still cost
                wait = backoff(attempt, self.base_delay, self.max_delay, e.retry_after)
                log.warning("%s: %s; retry %d of %d in %.1f s (%d retries in this run, at most %d "
                            "requests in flight now).", self.name, str(e).rstrip("."), attempt + 1,
                            self.max_retries, wait, retries, int(self.gate.limit))
                sleep(wait)
            except BaseException:
                self._release(busy=False)
                raise
            else:
                self._release(busy=False, ok=True)
                return result
        raise AssertionError("unreachable")

    # ---- adaptive concurrency -----------------------------------------------------------------
    @property
    def limit(self) -> float:
        """Requests allowed in flight now, to this role's server (by every role on it)."""
        return self.gate.limit

    def _acquire(self) -> None:
        self.gate.acquire()
        with self._lock:
            self._in_flight += 1
            self._counts["requests"] += 1
            if self._watch is None:
                self._watch = threading.Thread(target=self._heartbeat, daemon=True,
                                               name=f"heartbeat:{self.name}")
                self._watch.start()

    def _heartbeat(self) -> None:
        """Never silent for long: while requests are in flight and none has come back for
        HEARTBEAT seconds, say so every HEARTBEAT seconds."""
        while True:
            time.sleep(HEARTBEAT)
            with self._lock:
                waiting, quiet = self._in_flight, time.monotonic() - self.gate.last_news
            if waiting and quiet >= HEARTBEAT:
                log.warning("%s: waiting for %d requests, none answered for %.0f s.", self.name,
                            waiting, quiet)

    def _release(self, busy: bool, ok: bool = False) -> None:
        with self._lock:
            self._in_flight -= 1
            if ok:
                self._answered += 1
                self._down_streak = 0
        self.gate.release(busy, ok)

    # ---- accounting ---------------------------------------------------------------------------
    def _fail(self, e: TransientError | Unscorable) -> None:
        """A request given up on: counted under its kind, and the tokens of its answer (if the
        server answered at all) counted too. A server that is down stops the run (see `DOWN`)."""
        kind = failure_kind(e)
        self._count_failure(kind)
        self._account(getattr(e, "usage", None) or Usage())
        with self._lock:
            self._down_streak = self._down_streak + 1 if kind in DOWN else 0
            down = self._down_streak >= (1 if self._answered == 0 else DOWN_AFTER)
        if down:
            raise BackendError(
                f"{self.name} has stopped answering: {self._down_streak} requests in a row failed "
                f"after all their retries ({e}); the run stops here. Start or fix the server and run "
                "the same command again: finished neurons are kept, failed ones redone.") from e

    def _count_failure(self, kind: str) -> None:
        with self._lock:
            self._failures[kind] += 1

    def _add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                self._counts[name] += n

    def _account(self, usage: Usage) -> None:
        with self._lock:
            self._counts["prompt_tokens"] += usage.prompt_tokens
            self._counts["completion_tokens"] += usage.completion_tokens
            if usage.prompt_tokens or usage.completion_tokens:
                self._unpriced.append((usage.prompt_tokens, usage.completion_tokens))

    def stats(self) -> dict[str, Any]:
        """Counters so far; ``cost_usd`` from LiteLLM's price table, None when the model is not
        in it (``cost_known`` False). Each fresh response is priced on its own (some prices
        depend on the prompt's length)."""
        with self._lock:
            pending, self._unpriced = self._unpriced, []
            counts = dict(self._counts) | {"failures": dict(self._failures)}
        server = getattr(self.backend, "server", None)
        if server:   # who answered: the served model's name, root and server version
            counts["served"] = {"model": getattr(self.backend, "model", None), **server}
        if pending and self._cost is not None:
            model = priced_model(self.identity())
            total: float | None = 0.0
            for p, c in pending:
                one = price(str(model), p, c) if model else None
                if one is None:
                    total = None
                    break
                total += one
            with self._lock:
                if self._cost is not None:
                    self._cost = None if total is None else self._cost + total
        cost = self._cost
        return counts | {"cost_usd": cost, "cost_known": cost is not None}
