"""The local backend: a transformers causal LM in this process (CPU or GPU), no network.

``prompt_logprobs`` is exact: a softmax over the full vocabulary at each placeholder, read for the
candidates' tokens, with multi-token candidates scored in the same forward pass (see
``candidates.py``). Prompts of one call that share a token prefix (instructions, few-shot
examples, the explanation) have that prefix computed once into a KV cache; the excerpts are then
batched after it. The prefix of the last call is kept: a call computes only what it does not
share with it, a generation too (an explainer's prompts share their instructions and examples),
and ``Usage`` counts the prompt tokens run.
"""

from __future__ import annotations

import copy
import inspect
import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple, Sequence

import torch
from transformers import DynamicCache

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
    Unscorable,
    Usage,
)
from neuronlens.backends.candidates import (
    TrieNode,
    build_trie,
    candidate_probs,
    candidate_tokens,
    inner_paths,
)
from neuronlens.backends.gather import Gather
from neuronlens.errors import UserError
from neuronlens.models import display_name, load_model


@dataclass
class _Query:
    """One placeholder of one prompt: the model reads its context up to token ``j``."""

    j: int
    trie: TrieNode
    paths: list[tuple[int, ...]]
    n_candidates: int


class LocalBackend(Backend):
    def __init__(self, model: str = "embedded", device: str = "auto", dtype: str = "auto",
                 batch_size: int = 8, prefix_reuse: bool = True,
                 context_length: int | None = None):
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}.")
        self.model_name, self.device, self.dtype = model, device, dtype
        self.batch_size, self.prefix_reuse = batch_size, prefix_reuse
        self._context_length = context_length
        self.model = self.tokenizer = None
        self._kept: tuple[tuple[int, ...], DynamicCache] | None = None   # the last prompt prefix
        self._kept_lock = threading.Lock()
        self._scoring = Gather(self._prompt_logprobs)   # one scoring call at a time, all threads'
        self._generation = Gather(self._generate_many)   # one at a time: a sampled answer seeds torch
        # greedy answers of several threads decoded as one batch: None, where the model is on an
        # accelerator (a CPU is at its FLOP peak with one: 0.91x there, benchmarks/explain.py)
        self.batch_generations: bool | None = None

    @property
    def name(self) -> str:
        return f"local:{display_name(self.model_name)}"

    def identity(self) -> dict:
        return {"backend": "local", "model": self.model_name, "dtype": self.dtype}

    def load(self) -> None:
        if self.model is None:
            self.model, self.tokenizer = load_model(self.model_name, self.device, self.dtype)

    @property
    def capabilities(self) -> Capabilities:
        self.load()
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", 2048)
        return Capabilities(chat=self.tokenizer.chat_template is not None, completion=True,
                            output_logprobs=True, prompt_logprobs=True,
                            context_length=min(limit, self._context_length or limit))

    def count_tokens(self, text: str) -> int:
        self.load()
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- generation ---------------------------------------------------------------------------
    def render(self, request: GenerateRequest) -> list[int]:
        """The token ids of the request's prompt, as the model reads them."""
        if request.prompt is not None:
            return self.tokenizer(request.prompt)["input_ids"]
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if self.tokenizer.chat_template is None:
            raise BackendError(f"Model {self.model_name} has no chat template; use the "
                               "completion prompt format.")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=True, return_dict=True)["input_ids"])

    def generate(self, request: GenerateRequest) -> Generation:
        # the requests of every thread (explanations of neurons in flight) go together
        return self._generation([request])[0]

    @torch.no_grad()
    def _generate_many(self, requests: list[GenerateRequest]) -> list[Generation]:
        self.load()
        batch = self.batch_generations
        if batch is None:
            batch = next(self.model.parameters()).device.type != "cpu"
        if batch and len(requests) > 1 and all(r.temperature == 0 for r in requests) and not self._sliding_window():
            return self._greedy_batch(requests)
        return [self._generate_one(r) for r in requests]   # a sampled answer reads its own seed

    def _generate_one(self, request: GenerateRequest) -> Generation:
        ids = self.render(request)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        sample = request.temperature > 0
        n = request.n if sample else 1  # greedy: every one of the n answers is the same
        run, cache = len(ids), {}
        if self.prefix_reuse and len(ids) > 1:   # all but the last prompt token, from the kept prefix
            past, computed = self._prefix_cache(ids[:-1], device)
            past.batch_repeat_interleave(n)
            run, cache = computed + 1, {cache_argument(type(self.model)): past}
        torch.manual_seed(request.seed)
        out = self.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), **cache,
            max_new_tokens=request.max_tokens, do_sample=sample,
            temperature=request.temperature if sample else None, top_p=None, top_k=None,
            num_return_sequences=n, return_dict_in_generate=True,
            output_logits=request.top_logprobs > 0,
            stop_strings=list(request.stop) or None, tokenizer=self.tokenizer,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        new = out.sequences[:, len(ids):].repeat(request.n // n, 1)
        completions = []
        for row in range(new.shape[0]):
            tokens = new[row].tolist()
            eos = self.tokenizer.eos_token_id
            if eos in tokens:
                tokens = tokens[:tokens.index(eos)]
            steps = [out.logits[step][row % len(out.sequences)] for step in range(len(tokens))] \
                if request.top_logprobs > 0 else []
            completions.append(self._completion(request, tokens, steps))
        return Generation(tuple(completions), Usage(run, sum(len(c.token_ids) for c in completions)))

    def _greedy_batch(self, requests: list[GenerateRequest]) -> list[Generation]:
        """Greedy answers to several requests decoded together: their shared prefix from the
        kept cache, the rest of each prompt as one padded batch, then one token of every
        prompt per pass, each row seeing its own prompt only (as ``_generate_one`` answers)."""
        ids = [self.render(r) for r in requests]
        device = next(self.model.parameters()).device
        B = len(ids)
        ends = set(_as_list(self.model.generation_config.eos_token_id)) | {self.tokenizer.eos_token_id}
        P = min(_shared_prefix(ids), min(map(len, ids)) - 1) if self.prefix_reuse else 0
        cache, computed = self._prefix_cache(ids[0][:P], device) if P > 0 else (None, 0)
        S = [len(x) - P for x in ids]
        L = max(S)
        input_ids = torch.zeros(B, L, dtype=torch.long)
        positions = torch.arange(P, P + L).repeat(B, 1)
        allowed = torch.zeros(B, L, P + L, dtype=torch.bool)
        for b, x in enumerate(ids):
            input_ids[b, :S[b]] = torch.tensor(x[P:])
            allowed[b, :S[b], :P] = True
            allowed[b, :S[b], P:P + S[b]] = torch.tril(torch.ones(S[b], S[b], dtype=torch.bool))
            allowed[b, range(S[b], L), range(P + S[b], P + L)] = True   # padding sees itself
        hidden, past = self._masked_forward(input_ids, positions, allowed, P, cache, device, keep=True)
        logp = self._log_softmax(hidden[torch.arange(B), torch.tensor(S) - 1])
        sees = torch.zeros(B, 1, P + L, dtype=torch.bool)   # per row: the prefix and its own prompt
        for b in range(B):
            sees[b, 0, :P + S[b]] = True
        answers: list[list[int]] = [[] for _ in ids]
        steps: list[list[torch.Tensor]] = [[] for _ in ids]
        live = set(range(B))
        for _ in range(max(r.max_tokens for r in requests)):
            for b in sorted(live):
                t = int(logp[b].argmax())
                if t in ends:
                    live.discard(b)
                    continue
                answers[b].append(t)
                if requests[b].top_logprobs > 0:
                    steps[b].append(logp[b])
                text = self.tokenizer.decode(answers[b], skip_special_tokens=True)
                if len(answers[b]) >= requests[b].max_tokens or any(x in text for x in requests[b].stop):
                    live.discard(b)
            if not live:
                break
            sees = torch.cat([sees, torch.ones(B, 1, 1, dtype=torch.bool)], dim=2)   # its new token
            nxt = torch.tensor([[a[-1] if a else 0] for a in answers])
            at = torch.tensor([[len(x) + len(a) - 1] for x, a in zip(ids, answers)])
            hidden, past = self._masked_forward(nxt, at, sees, sees.shape[2] - 1, past, device,
                                                keep=True, extend=True)
            logp = self._log_softmax(hidden[:, 0])
        out = []
        for b, (r, tokens) in enumerate(zip(requests, answers)):
            completion = self._completion(r, tokens, steps[b])
            run = S[b] + (computed if b == 0 else 0)   # the prompt tokens run, the kept prefix's new part once
            out.append(Generation((completion,) * r.n, Usage(run, len(tokens) * r.n)))
        return out

    def _completion(self, request: GenerateRequest, tokens: list[int], steps: list[torch.Tensor]) -> Completion:
        """An answer of ``tokens`` (without the end-of-text), cut at the first stop string, with
        each token's log-probability and top alternatives read from ``steps`` (the logits of
        each step) when the request asks for them."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        finish = "length" if len(tokens) >= request.max_tokens else "stop"
        for stop in request.stop:
            if stop in text:
                text, finish = text[:text.index(stop)], "stop"
        logprobs = None
        if request.top_logprobs > 0:
            logprobs = []
            for row, tok in zip(steps, tokens):
                lp = torch.log_softmax(row.float(), dim=-1)
                top = lp.topk(min(request.top_logprobs, lp.shape[-1]))
                alts = tuple((self.tokenizer.decode([int(i)]), float(v))
                             for v, i in zip(top.values, top.indices))
                logprobs.append(TokenLogprob(self.tokenizer.decode([tok]), float(lp[tok]), alts))
            logprobs = tuple(logprobs)
        return Completion(text, logprobs, finish, tuple(tokens))

    # ---- prompt scoring -----------------------------------------------------------------------
    def _queries(self, request: PromptLogprobRequest, ids: list[int], offsets) -> list[_Query]:
        queries, tries = [], {}
        for c in request.positions:
            j = next((i for i, (s, e) in enumerate(offsets) if s <= c < e), None)
            if j is None or j == 0:
                raise Unscorable(f"No prompt token covers placeholder offset {c}.")
            lead = request.prompt[offsets[j][0]:c]
            if lead not in tries:
                trie = build_trie(candidate_tokens(self.tokenizer, lead, request.candidates))
                tries[lead] = (trie, inner_paths(trie))
            queries.append(_Query(j, *tries[lead], len(request.candidates)))
        return queries

    def prompt_logprobs(self, requests: Sequence[PromptLogprobRequest]) -> list[TokenDistributions]:
        # the calls of every thread (neurons in flight) are scored together, one at a time
        return self._scoring(list(requests))

    @torch.no_grad()
    def _prompt_logprobs(self, requests: list[PromptLogprobRequest]) -> list[TokenDistributions]:
        self.load()
        encoded = []
        for r in requests:
            enc = self.tokenizer(r.prompt, return_offsets_mapping=True)
            encoded.append((enc["input_ids"], self._queries(r, enc["input_ids"], enc["offset_mapping"])))
        # what each prompt can take from a cache: its tokens before its first placeholder's
        caps = [min([len(ids) - 1] + [q.j - 1 for q in qs]) for ids, qs in encoded]
        if not self.prefix_reuse:
            P = 0
        elif len(requests) > 1:   # the prompts' common prefix, computed once
            P = _shared_prefix([ids for ids, _ in encoded])
        else:                     # one prompt: only what it shares with the kept prefix
            P = _shared_prefix([list(self._kept[0]) if self._kept else [], encoded[0][0]])
        P = min([P] + caps)
        device = next(self.model.parameters()).device
        cache, computed = self._prefix_cache(encoded[0][0][:P], device) if P > 0 else (None, 0)
        tree = self._prefix_tree(encoded, caps, P, cache, device) if self.prefix_reuse else None
        keys = None
        if tree is None:   # each prompt's tokens after the common prefix, batched
            items = [(ids, qs, P, range(P)) for ids, qs in encoded]
            charged = {0: computed}
        else:   # the prompts' own prefixes (the explanations of several neurons) as one tree first
            keys = torch.cat([torch.arange(P), tree.positions])
            cache = tree.past
            items = [(ids, qs, cap, [*range(P), *(P + c for c in chain)])
                     for (ids, qs), cap, chain in zip(encoded, caps, tree.chains)]
            charged = _first_use(tree.chains)
            charged[0] = charged.get(0, 0) + computed
        results: list[TokenDistributions | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(encoded[i][0]) - items[i][2]))  # by length
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            dists = self._score_batch([items[i] for i in chunk], cache, device, keys)
            for i, (probs, mass, n_tok) in zip(chunk, dists):
                # the tokens run: each prompt's own, and the shared ones it was the first to need
                results[i] = TokenDistributions(probs, mass, Usage(n_tok + charged.get(i, 0), 0))
        return results

    def _prefix_tree(self, encoded, caps: list[int], P: int, cache, device) -> Tree | None:
        """The prompts' tokens from ``P`` to their caps run as one tree (``_tree_pass``), where
        that spares at least a token per prompt: prompts of several neurons share the
        instructions (``P``), and each neuron's excerpts share its explanation."""
        prefixes = [ids[:cap] for (ids, _), cap in zip(encoded, caps)]
        replaced = sum(cap - P for cap in caps)
        if len(prefixes) < 2 or min(caps) <= P or replaced - _tree_size(prefixes, P) < len(prefixes):
            return None
        return self._tree_pass(prefixes, P, cache, device, keep=True)

    def reset_prefix_cache(self) -> None:
        """Forget the kept prefix: the next call computes its prompt whole."""
        with self._kept_lock:
            self._kept = None

    def _prefix_cache(self, ids: list[int], device) -> tuple[DynamicCache, int]:
        """The KV cache of the prompt prefix ``ids``, and how many of its tokens were computed.
        The part it shares with the previous call's prefix (a simulator's instructions and
        examples, up to the explanation) is not computed again, as vLLM's prefix caching does;
        a prefix that adds nothing to the kept one leaves it kept. A plain cache keeps every
        prefix token, also for sliding-window layers."""
        with self._kept_lock:
            kept_ids, kept = self._kept or ((), None)
            start = min(_shared_prefix([list(kept_ids), ids]), len(ids)) if kept is not None else 0
            cache = DynamicCache()
            if start:
                cache = copy.deepcopy(kept)
                cache.crop(start - len(kept_ids))   # keep the first `start` tokens
            if start < len(ids):   # no LM head needed
                name = cache_argument(type(self.model.base_model))
                cache = self.model.base_model(
                    input_ids=torch.tensor([ids[start:]], device=device),
                    position_ids=torch.arange(start, len(ids), device=device)[None],
                    use_cache=True, **{name: cache})[name]
            if start < len(ids) or kept is None:
                self._kept = (tuple(ids), copy.deepcopy(cache))
            return cache, len(ids) - start

    def _score_batch(self, items, cache, device, keys: torch.Tensor | None = None):
        """One forward pass over a batch of prompt suffixes plus their trie query tokens. Each
        item is (ids, queries, start, seen): the prompt's tokens from ``start`` are run, seeing
        the cached keys ``seen`` (of ``cache``, at positions ``keys``; default 0, 1, ...)."""
        C = 0 if cache is None else cache.get_seq_length()
        rows = []  # per item: tokens, positions, list of (attend-to indices) for extras
        for ids, queries, P, _seen in items:
            tokens = list(ids[P:])
            positions = list(range(P, len(ids)))
            parents, slot_of = [], []
            for q in queries:
                slots = {}
                for path in q.paths:
                    slots[path] = len(tokens)
                    tokens.append(path[-1])
                    positions.append(q.j + len(path) - 1)
                    parents.append((q.j - P, [slots[path[:d]] for d in range(1, len(path) + 1)]))
                slot_of.append(slots)
            rows.append((tokens, positions, parents, slot_of, len(ids) - P))
        L = max(len(r[0]) for r in rows)
        B = len(rows)
        allowed = torch.zeros(B, L, C + L, dtype=torch.bool)
        input_ids = torch.zeros(B, L, dtype=torch.long)
        position_ids = torch.zeros(B, L, dtype=torch.long)
        for b, (tokens, positions, parents, _slots, S) in enumerate(rows):
            input_ids[b, :len(tokens)] = torch.tensor(tokens)
            position_ids[b, :len(positions)] = torch.tensor(positions)
            allowed[b, :, list(items[b][3])] = True
            allowed[b, :S, C:C + S] = torch.tril(torch.ones(S, S, dtype=torch.bool))
            for e, (j, chain) in enumerate(parents):
                row = S + e
                allowed[b, row, C:C + j] = True        # prompt tokens before the placeholder
                allowed[b, row, [C + s for s in chain]] = True
            for row in range(len(tokens), L):      # padding attends to itself only
                allowed[b, row, :] = False
                allowed[b, row, C + row] = True
        hidden, _ = self._masked_forward(input_ids, position_ids, allowed, C, cache, device, key_positions=keys)
        out = []
        for b, (tokens, _pos, _parents, slot_of, S) in enumerate(rows):
            _ids, queries, P, _seen = items[b]
            # which rows we need logits for: the row before each placeholder, and each extra token
            need = sorted({q.j - 1 - P for q in queries} | {s for sl in slot_of for s in sl.values()})
            logp = self._log_softmax(hidden[b, need])
            at = {r: n for n, r in enumerate(need)}
            probs, mass = [], []
            for q, slots in zip(queries, slot_of):
                def dist(row: int, wanted) -> dict[int, float]:
                    return {t: math.exp(float(logp[at[row], t])) for t in wanted}
                nxt = {(): dist(q.j - 1 - P, q.trie.children)}
                for path in q.paths:
                    node = q.trie
                    for t in path:
                        node = node.children[t]
                    nxt[path] = dist(slots[path], node.children)
                p = candidate_probs(q.trie, q.n_candidates, nxt)
                total = sum(p)
                mass.append(total)
                probs.append(tuple(x / total for x in p) if total > 0 else tuple(p))
            out.append((tuple(probs), tuple(mass), len(tokens)))
        return out

    def _masked_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                        allowed: torch.Tensor, P: int, cache, device, keep: bool = False,
                        key_positions: torch.Tensor | None = None, extend: bool = False):
        """Last hidden states of ``input_ids`` [B, L] after ``P`` cached tokens (at positions
        ``key_positions`` [P], default 0..P-1), each token seeing only the keys ``allowed``
        [B, L, P + L] marks (a token tree in one pass), and with ``keep`` the cache extended by
        these tokens (else None): a copy of ``cache`` repeated B times, or with ``extend``
        ``cache`` itself (B rows already)."""
        B, L = input_ids.shape
        dtype = next(self.model.parameters()).dtype

        def additive(ok: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros(B, 1, L, P + L, dtype=dtype)
            return mask.masked_fill_(~ok[:, None], torch.finfo(dtype).min).to(device)

        mask = additive(allowed)
        window = self._sliding_window()
        if window:  # models mixing full and sliding-window layers (Gemma 2/3) get a mask for each
            cached = torch.arange(P) if key_positions is None else key_positions
            keys = torch.cat([cached.expand(B, P), position_ids], dim=1)  # [B, P+L]
            near = position_ids[:, :, None] - keys[:, None, :] < window
            mask = {"full_attention": mask, "sliding_attention": additive(allowed & near)}
        past = DynamicCache() if keep and cache is None else None
        if cache is not None and extend:
            past = cache
        elif cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(B)
        name = cache_argument(type(self.model.base_model))
        out = self.model.base_model(
            input_ids=input_ids.to(device), position_ids=position_ids.to(device),
            attention_mask=mask, use_cache=past is not None, **{name: past})
        return out.last_hidden_state, out[name] if keep else None

    def _tree_pass(self, prompts: list[list[int]], P: int, cache, device, keep: bool = False):
        """The next-token log-probabilities after each prompt, the prompts' tokens after the
        first ``P`` (cached) run as one tree, each token seeing its own prompt's tokens only;
        with ``keep``, also the cache extended by the tree (see ``Tree``)."""
        root: dict = {}              # the tree: token -> (slot, children)
        tokens: list[int] = []
        chains: list[list[int]] = []   # per slot: its ancestors' slots and itself
        last: list[int] = []           # per prompt: the slot of its last token
        for ids in prompts:
            node, chain = root, []
            for t in ids[P:]:
                if t not in node:
                    node[t] = (len(tokens), {})
                    tokens.append(t)
                    chains.append(chain + [len(tokens) - 1])
                slot, node = node[t]
                chain = chains[slot]
            last.append(slot)
        n = len(tokens)
        allowed = torch.zeros(1, n, P + n, dtype=torch.bool)
        allowed[0, :, :P] = True
        for slot, chain in enumerate(chains):
            allowed[0, slot, [P + c for c in chain]] = True
        positions = torch.tensor([[P + len(chain) - 1 for chain in chains]])
        hidden, past = self._masked_forward(torch.tensor([tokens]), positions, allowed, P, cache, device, keep)
        return Tree(self._log_softmax(hidden[0, last]), past, positions[0], [chains[s] for s in last])

    @torch.no_grad()
    def next_token_logprobs(self, prompts: Sequence[Sequence[int]], max_tree: int = 2048) -> list[torch.Tensor]:
        """Log-probabilities over the vocabulary of the token after each prompt (token ids), as
        a forward pass over that prompt alone gives them. Prompts that share a prefix (a
        simulator's follow-ups share all but their last few tokens) are computed together: the
        shared prefix once (kept across calls, see ``_prefix_cache``), the rest as one tree of
        tokens, each token seeing its own prompt's tokens only (at most ``max_tree`` per pass)."""
        prompts, P, cache, device = self._shared(prompts)
        return [logp for group in _trees(prompts, P, max_tree) for logp in self._tree_pass(group, P, cache, device).logp]

    @torch.no_grad()
    def greedy_tree(self, prompts: Sequence[Sequence[int]], steps: int, choose, max_tree: int = 2048) -> None:
        """Up to ``steps`` tokens after each prompt (token ids), all prompts together:
        ``choose(i, logprobs)`` is given prompt ``i``'s next-token log-probabilities and returns
        the token it continues with (None: it stops there). The first step is one tree pass, as
        ``next_token_logprobs``; each later step is one pass over the live prompts' new tokens
        alone, reading the keys and values the earlier passes left, each token seeing its own
        prompt's (as a forward pass over that prompt whole)."""
        if steps < 1:
            return
        prompts, P, cache, device = self._shared(prompts)
        groups = _trees(prompts, P, max_tree)
        one_tree = len(groups) == 1   # else each step is a tree of its own
        if one_tree:
            logp, past, positions, chains = self._tree_pass(prompts, P, cache, device, keep=True)
            keys = torch.cat([torch.arange(P), positions])         # the cached keys' positions
            seen = [[P + c for c in chain] for chain in chains]    # per prompt: its cached keys
        else:   # the groups just made, on the prefix cache just fetched
            logp = [lp for group in groups for lp in self._tree_pass(group, P, cache, device).logp]
        live = list(range(len(prompts)))
        rows = dict(zip(live, logp))
        for step in range(steps):
            nxt = [(i, t) for i in live if (t := choose(i, rows[i])) is not None]
            if not nxt or step == steps - 1:
                return
            live = [i for i, _ in nxt]
            if not one_tree:
                for i, t in nxt:
                    prompts[i] = prompts[i] + [t]
                rows = dict(zip(live, self.next_token_logprobs([prompts[i] for i in live], max_tree)))
                continue
            C, m = keys.shape[0], len(nxt)
            allowed = torch.zeros(1, m, C + m, dtype=torch.bool)
            allowed[0, :, :P] = True
            for r, (i, _) in enumerate(nxt):
                seen[i].append(C + r)
                allowed[0, r, seen[i]] = True
            new_positions = torch.tensor([[len(prompts[i]) + step for i in live]])   # each prompt's next
            hidden, past = self._masked_forward(torch.tensor([[t for _, t in nxt]]), new_positions, allowed,
                                                C, past, device, keep=True, key_positions=keys, extend=True)
            keys = torch.cat([keys, new_positions[0]])
            rows = dict(zip(live, self._log_softmax(hidden[0])))

    def _shared(self, prompts: Sequence[Sequence[int]]):
        """The prompts as lists, the length of the prefix they share (all but one token of the
        shortest at most), its KV cache (None when empty) and the device."""
        self.load()
        prompts = [list(p) for p in prompts]
        if not prompts or not all(prompts):
            raise ValueError("next_token_logprobs needs non-empty prompts.")
        device = next(self.model.parameters()).device
        P = min(_shared_prefix(prompts), min(len(p) for p in prompts) - 1)
        cache = self._prefix_cache(prompts[0][:P], device)[0] if P > 0 else None
        return prompts, P, cache, device

    def _sliding_window(self) -> int | None:
        """The window of the model's sliding-window layers, if it has both kinds of layer."""
        config = self.model.config.get_text_config()
        kinds = set(getattr(config, "layer_types", None) or ())
        return getattr(config, "sliding_window", None) if "sliding_attention" in kinds else None

    def _log_softmax(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)


class Tree(NamedTuple):
    """A tree pass (``LocalBackend._tree_pass``): per prompt the next-token log-probabilities;
    with ``keep``, the KV cache extended by the tree's tokens (else None), the tokens' positions,
    and per prompt the tree slots of its tokens."""

    logp: torch.Tensor
    past: Any
    positions: torch.Tensor
    chains: list[list[int]]


@lru_cache(maxsize=None)
def cache_argument(model_class: type) -> str:
    """The name under which ``model_class.forward`` takes (and returns) the KV cache: ``cache``
    in the transformers versions that renamed it (passing the old name warns on every call),
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _trees(prompts: list[list[int]], P: int, max_tree: int) -> list[list[list[int]]]:
    """``prompts`` in order, in groups whose tokens after the first ``P`` make trees of at most
    ``max_tree`` tokens (a prompt longer than that alone in its group)."""
    groups: list[list[list[int]]] = [[]]
    root: dict = {}   # token -> children
    size = 0
    for ids in prompts:
        rest, node, d = ids[P:], root, 0
        while d < len(rest) and rest[d] in node:   # the part already in the tree
            node, d = node[rest[d]], d + 1
        if groups[-1] and size + len(rest) - d > max_tree:
            groups.append([])
            root, size, d = {}, 0, 0
            node = root
        for t in rest[d:]:   # the rest of it, added
            node = node.setdefault(t, {})
        groups[-1].append(ids)
        size += len(rest) - d
    return groups


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _tree_size(prompts: list[list[int]], P: int) -> int:
    """How many tokens ``prompts`` have after the first ``P`` as one tree (shared ones once)."""
    root: dict = {}
    size = 0
    for ids in prompts:
        node = root
        for t in ids[P:]:
            if t not in node:
                node[t], size = {}, size + 1
            node = node[t]
    return size


def _first_use(chains: list[list[int]]) -> dict[int, int]:
    """Per prompt (by index), how many tree slots of its chain no earlier prompt's has: the
    shared tokens each prompt is charged for."""
    seen: set[int] = set()
    charged = {}
    for i, chain in enumerate(chains):
        new = [s for s in chain if s not in seen]
        seen.update(new)
        if new:
            charged[i] = len(new)
    return charged


def _shared_prefix(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n
