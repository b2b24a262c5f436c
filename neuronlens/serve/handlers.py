"""The answers: a request body in, the OpenAI-shaped answer out, as vLLM gives it. Completions
(``complete``): the legacy ``logprobs`` object with ``echo``, vLLM's ``prompt_logprobs`` and
``return_token_ids``, a list of greedy one-token prompts in one forward pass, prompts of token
ids, and on greedy completions ``logit_bias`` (reported logprobs before it) and vLLM's
``logprob_token_ids``; chat (``complete_chat``): ``logprobs``/``top_logprobs``. The
`wrong_length` fault drops an entry here."""

from __future__ import annotations

from functools import lru_cache
from itertools import accumulate
from typing import Any

from tokenizers import decoders

from neuronlens.backends.base import Completion, GenerateRequest, Message, TokenLogprob
from neuronlens.models import BYTE_ALPHABET
from neuronlens.serve.engine import (PromptScores, ServerState, biased_greedy, greedy_tokens,
                                     next_token, token_text)
from neuronlens.serve.faults import maybe_cut
from neuronlens.serve.schemas import ApiError, ChatBody, CompletionBody, RequestBody, envelope


@lru_cache(maxsize=1 << 20)
def _legacy_piece(tok: Any, token_id: int) -> str:
    """A token as OpenAI's legacy completions wrote it: its text, or ``bytes:\\xNN...`` (the
    hex of its bytes) where those bytes are not valid UTF-8 on their own. The bytes are known
    for byte-level BPE tokenizers; for other tokenizers and added tokens, the decoded text."""
    backend = getattr(tok, "backend_tokenizer", None)
    if token_id in tok.added_tokens_decoder or not isinstance(getattr(backend, "decoder", None),
                                                              decoders.ByteLevel):
        return token_text(tok, token_id)
    try:
        raw = bytes(BYTE_ALPHABET[c] for c in tok.convert_ids_to_tokens(token_id))
    except KeyError:   # not a byte-level piece after all
        return token_text(tok, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _n_within(pieces: list[str], text: str) -> int:
    """How many of the generated tokens (their texts) start inside ``text`` (a stop string may
    have cut it short)."""
    starts = list(accumulate(map(len, pieces), initial=0))
    if starts[-1] <= len(text):
        return len(pieces)
    return sum(1 for at in starts[:-1] if at < len(text))


def _within(logprobs: tuple[TokenLogprob, ...], text: str) -> tuple[TokenLogprob, ...]:
    return logprobs[:_n_within([t.token for t in logprobs], text)]


def _top_dict(pairs: Any) -> dict[str, float]:
    """The legacy ``{token: logprob}`` map; of tokens that decode alike, the most likely wins."""
    out: dict[str, float] = {}
    for token, logprob in pairs:
        out.setdefault(token, logprob)
    return out


def _generate(state: ServerState, body: RequestBody, max_tokens: int, k: int | None,
              prompt: str | None = None, messages: tuple[Message, ...] = ()) -> tuple[list[Completion], int, int]:
    """``n`` completions (greedy ones are generated once and repeated), prompt and completion tokens."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    n = body.n if body.temperature > 0 else 1
    request = GenerateRequest(messages=messages, prompt=prompt, max_tokens=max_tokens,
                              temperature=body.temperature, n=n, stop=stop, seed=body.seed or 0,
                              top_logprobs=0 if k is None else max(k, 1))
    gen = state.backend.generate(request)
    completions = list(gen.completions) * (body.n // n)
    # the prompt's length, as OpenAI and vLLM report it (the backend counts only what it ran)
    return completions, len(state.backend.render(request)), gen.usage.completion_tokens * (body.n // n)


def _legacy_logprobs(tok: Any, c: Completion, k: int, ids: list[int],
                     scores: PromptScores | None) -> dict[str, list]:
    """The legacy ``logprobs`` object: prompt tokens first when echoed (``scores`` given), a BOS
    included. ``text_offset`` is, as vLLM computes it, the running sum of the tokens' lengths,
    so after a BOS or a ``bytes:`` token it no longer points into the text."""
    tokens, logprobs, tops = [], [], []
    if scores is not None:
        tokens = [_legacy_piece(tok, t) for t in ids]
        logprobs = [None, *scores.logprob]
        tops = [None] + [_top_dict((_legacy_piece(tok, t), v) for t, v in top[:k])
                         for top in scores.top]
    for t in _within(c.logprobs or (), c.text):
        tokens.append(t.token)
        logprobs.append(t.logprob)
        tops.append(_top_dict(t.top[:k]))
    offsets = list(accumulate(map(len, tokens[:-1]), initial=0)) if tokens else []
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def _vllm_prompt_logprobs(tok: Any, ids: list[int], k: int, scores: PromptScores) -> list[dict | None]:
    """vLLM's shape: per prompt token, the top-k at its position plus the token itself."""
    entries: list[dict | None] = [None]
    for j in range(1, len(ids)):
        entry = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": token_text(tok, t)}
                 for r, (t, v) in enumerate(scores.top[j - 1][:k])}
        entry.setdefault(str(ids[j]), {"logprob": scores.logprob[j - 1], "rank": scores.rank[j - 1],
                                       "decoded_token": token_text(tok, ids[j])})
        entries.append(entry)
    return entries


def _check_k(state: ServerState, *ks: int | None) -> None:
    limit = state.max_logprobs
    if limit is not None and any(k is not None and k > limit for k in ks):
        raise ApiError(400, f"This server returns at most {limit} logprobs per token "
                            f"(start it with a higher max_logprobs).")


def _one_greedy_token(body: CompletionBody) -> bool:
    return body.max_tokens == 1 and body.temperature == 0 and not body.stop


def complete(state: ServerState, body: CompletionBody, fault: str) -> dict:
    tok = state.backend.tokenizer
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]   # one prompt: text, or token ids
    if not prompts or not all(prompts):
        raise ApiError(400, "prompt must be a non-empty string or list of token ids, or a list of them.")
    _check_k(state, body.logprobs, body.prompt_logprobs)
    ids = [list(tok(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompts]
    if any(not 0 <= t < len(tok) for p in ids for t in p):
        raise ApiError(400, f"token ids must lie in [0, {len(tok)}).")
    prompts = [p if isinstance(p, str) else tok.decode(p) for p in prompts]
    given: list[Completion | None] = [None] * len(prompts)
    if body.logit_bias or body.logprob_token_ids:   # greedy; the logprobs before any bias (raw)
        if body.temperature != 0 or body.echo or body.prompt_logprobs is not None or body.stop:
            raise ApiError(400, "This server applies logit_bias and logprob_token_ids to greedy "
                                "completions only (temperature 0, no echo, prompt_logprobs or stop).")
        if body.logprob_token_ids and body.logprobs is None:
            raise ApiError(400, "logprob_token_ids needs logprobs set.")
        try:
            bias = {int(t): float(v) for t, v in (body.logit_bias or {}).items()}
        except ValueError:
            raise ApiError(400, "logit_bias keys are token ids.") from None
        if any(not 0 <= t < len(tok) for t in [*bias, *(body.logprob_token_ids or ())]):
            raise ApiError(400, f"logit_bias and logprob_token_ids token ids must lie in [0, {len(tok)}).")
        given = biased_greedy(state, ids, body.logprobs or 0, body.max_tokens, bias, body.logprob_token_ids)
    elif len(prompts) > 1 and _one_greedy_token(body) and not body.echo and body.prompt_logprobs is None:
        given = greedy_tokens(state, ids, body.logprobs or 0)
    choices, n_prompt, n_gen = [], 0, 0
    for prompt, prompt_ids, done in zip(prompts, ids, given):   # n choices each, in order, as OpenAI does
        more, p, g = _complete_one(state, body, prompt, prompt_ids, done, fault == "wrong_length")
        choices += [c | {"index": len(choices) + i} for i, c in enumerate(more)]
        n_prompt, n_gen = n_prompt + p, n_gen + g
    return envelope("cmpl", "text_completion", body.model or state.model_name, choices,
                     n_prompt, n_gen)


def _complete_one(state: ServerState, body: CompletionBody, prompt: str, ids: list[int],
                  given: Completion | None, short: bool) -> tuple[list[dict], int, int]:
    tok = state.backend.tokenizer
    k = max(body.logprobs or 0, body.prompt_logprobs or 0)
    scores = state.prefix.run(ids, k)[0] \
        if body.prompt_logprobs is not None or (body.echo and body.logprobs is not None) else None
    if given is not None or _one_greedy_token(body):
        c = given or next_token(state, ids, body.logprobs or 0)
        completions, n_prompt, n_gen = [c] * body.n, len(ids), len(c.token_ids or ()) * body.n
    elif body.max_tokens > 0:
        completions, n_prompt, n_gen = _generate(state, body, body.max_tokens, body.logprobs, prompt=prompt)
    else:
        completions, n_prompt, n_gen = [Completion("", (), "length")] * body.n, len(ids), 0
    choices = []
    for c in completions:
        choice: dict[str, Any] = {"finish_reason": c.finish_reason, "logprobs": None,
                                  "text": (prompt if body.echo else "") + maybe_cut(c.text, short)}
        if body.logprobs is not None:
            k = 1 + len(body.logprob_token_ids) if body.logprob_token_ids else body.logprobs
            lp = _legacy_logprobs(tok, c, k, ids, scores if body.echo else None)
            choice["logprobs"] = {key: v[:-1] for key, v in lp.items()} if short else lp
        if body.prompt_logprobs is not None:
            entries = _vllm_prompt_logprobs(tok, ids, body.prompt_logprobs, scores)
            choice["prompt_logprobs"] = entries[:-1] if short else entries
        if body.return_token_ids:
            generated = list(c.token_ids or ())
            choice["prompt_token_ids"] = ids
            choice["token_ids"] = generated[:_n_within([token_text(tok, t) for t in generated], c.text)]
        choices.append(choice)
    return choices, n_prompt, n_gen


def complete_chat(state: ServerState, body: ChatBody, fault: str) -> dict:
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true.")
    _check_k(state, body.top_logprobs)
    messages = tuple(Message("system" if m.role == "developer" else m.role,
                             m.content if isinstance(m.content, str) else "".join(p.text for p in m.content))
                     for m in body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens or 128
    k = (body.top_logprobs or 0) if body.logprobs else None
    completions, n_prompt, n_gen = _generate(state, body, max_tokens, k, messages=messages)

    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    choices = []
    for i, c in enumerate(completions):
        logprobs = None
        if k is not None:
            content = [{**item(t.token, t.logprob), "top_logprobs": [item(*a) for a in t.top[:k]]}
                       for t in _within(c.logprobs or (), c.text)]
            logprobs = {"content": content[:-1] if fault == "wrong_length" else content}
        text = maybe_cut(c.text, fault == "wrong_length")
        choices.append({"index": i, "message": {"role": "assistant", "content": text},
                        "finish_reason": c.finish_reason, "logprobs": logprobs})
    return envelope("chatcmpl", "chat.completion", body.model or state.model_name, choices,
                     n_prompt, n_gen)
