"""The engine behind the API: the model loaded once (``make_state``, ``ServerState``), a prompt's
scores in one forward pass (``score_prompt``), the previous prompt's KV cache reused up to where
the next one differs (``PrefixCache``, as vLLM's automatic prefix caching), and greedy next tokens,
many at once over a tree of their tokens (``greedy_tokens``, ``LocalBackend.next_token_logprobs``)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from neuronlens.backends.base import Completion, TokenLogprob
from neuronlens.backends.local import LocalBackend, cache_argument
from neuronlens.serve.faults import fault_names, next_fault


# ---- the numeric core -------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptScores:
    """``logprob[j - 1]``, ``rank[j - 1]`` (1 = most likely) and ``top[j - 1]`` (k pairs of token
    id and logprob, most likely first) belong to prompt token ``j`` given tokens ``< j``."""

    logprob: list[float]
    rank: list[int]
    top: list[list[tuple[int, float]]]


@lru_cache(maxsize=1 << 20)
def token_text(tok: Any, token_id: int) -> str:
    """The text of one token (cached: a large top-k decodes the same ids over and over)."""
    return tok.decode([token_id])


@torch.no_grad()
def score_prompt(model: Any, ids: list[int], k: int) -> PromptScores:
    """One forward pass over ``ids``; log-softmax in float32 at every position."""
    scores = PrefixCache(model, keep=k).run(ids, k)[0]
    return PromptScores(scores.logprob, scores.rank, [top[:k] for top in scores.top])


def _scores(logits: torch.Tensor, ids: list[int], k: int) -> PromptScores:
    """Scores of tokens ``ids[1:]`` from the logits at the positions before each."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    actual = logp.gather(1, torch.tensor(ids[1:], device=logp.device)[:, None])
    rank = (logp > actual).sum(dim=1) + 1
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    pairs = [list(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)]
    return PromptScores(actual[:, 0].tolist(), rank.tolist(), pairs)


class PrefixCache:
    """The KV cache and scores of the last prompt run, reused for the longest prefix the next
    prompt shares with it, as vLLM's automatic prefix caching does: the excerpts of one neuron
    share the instructions, examples and explanation, and a simulator's follow-up prompts share
    all but their last tokens. ``run`` returns the prompt's scores (top-``k``, ``k`` at least
    ``keep``) and the log-probabilities of the token after it."""

    def __init__(self, model: Any, keep: int = 20):
        self.model, self.keep = model, keep
        self.ids: list[int] = []
        self.kv: Any = None
        self.scores = PromptScores([], [], [])
        self.k = 0

    @torch.no_grad()
    def run(self, ids: list[int], k: int) -> tuple[PromptScores, torch.Tensor]:
        from transformers import DynamicCache

        k = max(k, self.keep)
        shared = 0
        if self.kv is not None and k <= self.k:
            limit = min(len(ids), len(self.ids)) - 1
            while shared < limit and ids[shared] == self.ids[shared]:
                shared += 1
        start = max(shared - 1, 0)   # the position before the first new token runs again
        if start:
            self.kv.crop(start - self.kv.get_seq_length())
        else:
            self.kv = DynamicCache()
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=torch.tensor([ids[start:]], device=device), use_cache=True,
                            **{cache_argument(type(self.model)): self.kv}).logits[0]
        new = _scores(logits[:-1], ids[start:], k)
        old = self.scores
        self.scores = PromptScores(old.logprob[:start] + new.logprob, old.rank[:start] + new.rank,
                                   old.top[:start] + new.top)
        self.ids, self.k = list(ids), k
        return self.scores, torch.log_softmax(logits[-1].float(), dim=-1)


# ---- the state behind the server -------------------------------------------------------------
@dataclass
class ServerState:
    backend: LocalBackend
    model_name: str                    # the served name requests must use (strict_model)
    strict_model: bool = True          # like vLLM: 404 for a request naming another model
    faults: tuple[str, ...] = ()
    retry_after: float = 0.1
    slow_seconds: float = 5.0
    max_logprobs: int | None = 20      # like vLLM's --max-logprobs; None: any k
    requests: Counter = field(default_factory=Counter)       # by endpoint path
    fault_counts: Counter = field(default_factory=Counter)   # by fault name, POST requests only
    lock: threading.Lock = field(default_factory=threading.Lock)
    prefix: PrefixCache | None = None  # the last prompt's KV cache (see PrefixCache)
    api_key: str | None = field(default=None, repr=False)   # the bearer token requests must send
    tokens_computed: int = 0           # token positions the model ran (see __post_init__)
    _counting: Any = field(default=None, init=False, repr=False)   # the hook that counts them

    def __post_init__(self) -> None:
        if self.prefix is None:
            self.prefix = PrefixCache(self.backend.model)
        # every position any forward pass of the served model runs (prompt, tree and padding
        # tokens, generated steps): what serving cost, as vLLM's prompt tokens less its cache hits
        self._counting = self.backend.model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, _module: Any, inputs: tuple, _output: Any) -> None:
        self.tokens_computed += inputs[0].numel()

    def close(self) -> None:
        """Stop counting: the model may outlive the server (``load_model`` shares one copy)."""
        self._counting.remove()

    def reset_prefix_cache(self) -> None:
        """Forget every kept prefix (the server's and its backend's), as vLLM's
        ``/reset_prefix_cache``: the next request computes its prompt whole."""
        self.prefix = PrefixCache(self.backend.model)
        self.backend.reset_prefix_cache()

    def next_fault(self) -> str:
        return next_fault(self.faults, self.fault_counts)


def next_token(state: ServerState, ids: list[int], k: int) -> Completion:
    """The greedy one-token completion of ``ids``, as ``generate`` gives it, from the prefix
    cache (a simulator's follow-up prompts share all but their last tokens)."""
    return greedy(state.backend.tokenizer, state.prefix.run(ids, k)[1], k)


def greedy(tok: Any, logp: torch.Tensor, k: int, bias: dict[int, float] | None = None,
           wanted: list[int] | None = None) -> Completion:
    """The greedy token of a next-token distribution (under a logit ``bias``, token id -> value,
    which the logprobs reported do not see, as vLLM's raw_logprobs), with its top-``k``
    alternatives, or, given ``wanted`` ids, those ids' (vLLM's ``logprob_token_ids``)."""
    if bias:
        biased = logp.clone()
        biased[list(bias)] += torch.tensor(list(bias.values()), dtype=logp.dtype)
        best = int(biased.argmax())
    else:
        best = int(logp.argmax())
    if best == tok.eos_token_id:   # generate() stops there: no token, no text
        return Completion("", (), "stop", ())
    if wanted:
        alts = tuple((token_text(tok, i), float(logp[i])) for i in [best, *wanted])
    else:
        top = logp.topk(min(max(k, 1), logp.shape[-1]))
        alts = tuple((token_text(tok, int(i)), float(v)) for v, i in zip(top.values, top.indices))
    piece = token_text(tok, best)
    return Completion(piece, (TokenLogprob(piece, float(logp[best]), alts),), "length", (best,))


def greedy_tokens(state: ServerState, ids: list[list[int]], k: int) -> list[Completion]:
    """Many greedy one-token completions at once (a simulator's follow-ups): one forward pass
    over a tree of their tokens, the prefix they share computed once."""
    tok = state.backend.tokenizer
    return [greedy(tok, logp, k) for logp in state.backend.next_token_logprobs(ids)]


def biased_greedy(state: ServerState, ids: list[list[int]], k: int, steps: int,
                  bias: dict[int, float], wanted: list[int] | None = None) -> list[Completion]:
    """Greedy completions of ``steps`` tokens under a logit ``bias``, every prompt's step taken
    together (the first as one tree pass, as ``greedy_tokens``; each later one over the new tokens
    alone, reading the tree's keys and values), the logprobs as the model gives them (of the
    ``wanted`` ids, if given)."""
    tok = state.backend.tokenizer
    done: list[list[Completion]] = [[] for _ in ids]

    def choose(i: int, logp: torch.Tensor) -> int | None:
        step = greedy(tok, logp.float().cpu(), k, bias, wanted)
        done[i].append(step)
        return step.token_ids[0] if step.token_ids else None   # an end-of-text token ends it

    state.backend.greedy_tree(ids, steps, choose)
    return [Completion("".join(c.text for c in steps_), tuple(t for c in steps_ for t in c.logprobs),
                       "stop" if steps_ and not steps_[-1].token_ids else "length",
                       tuple(t for c in steps_ for t in c.token_ids))
            for steps_ in done]


def make_state(model: str, device: str = "auto", dtype: str = "auto", strict_model: bool = True,
               faults: Any = (), retry_after: float = 0.1, slow_seconds: float = 5.0,
               max_logprobs: int | None = 20, api_key: str | None = None) -> ServerState:
    """Validate the options and load the model (once)."""
    names = fault_names(faults)
    backend = LocalBackend(model=model, device=device, dtype=dtype)
    backend.load()
    return ServerState(backend, model, strict_model, names, retry_after, slow_seconds, max_logprobs,
                       api_key=api_key or None)
