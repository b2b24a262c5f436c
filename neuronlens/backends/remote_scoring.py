"""Candidate scoring at placeholder offsets from a remote server's top-k prompt logprobs.

A remote server tells us, for every prompt token j, its start offset in the prompt text and the
top-k next-token strings with their logprobs given the tokens before j. For a placeholder at
character c we take the token j covering c and the text ``lead = prompt[start_j:c]`` it carries
before the placeholder (empty when the placeholder starts a token). A candidate ("0".."10") reads
``lead + candidate`` there:

- if that whole string is a key of the top-k at j, it is one token;
- otherwise its first token is the longest key that is a proper prefix of it ("1" for "10"), and
  the rest needs the next-token distribution after ``prompt[:start_j] + "1"``: a follow-up query.
  Follow-ups are answered in rounds, one request per round for all placeholders of a prompt
  (``follow_up`` receives the list of prefix texts and returns one top-k dict for each).

The token paths then go into the same trie as the local backend (``candidates.py``), so a
candidate that is a prefix of another keeps only the mass that does not continue:
P(1) = P("1") * (1 - P("0" | "1")), P(10) = P("1") * P("0" | "1").

Truncation: a token missing from a top-k list has probability 0 (the server did not report it),
so a candidate whose tokens fall outside the top-k gets 0. ``mass`` (the total over candidates
before renormalising) shows how much was seen; ask for k >= the candidates' plausible ranks.
Segmenting by longest known prefix assumes the server's tokenizer would split the text that way
(true for byte-level BPE with digits split or merged); the follow-up prefixes are sent as text
and re-tokenised by the server.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

from neuronlens.backends.base import PromptLogprobRequest, Unscorable
from neuronlens.backends.candidates import build_trie, candidate_probs

TokenPath = tuple[str, ...]   # token strings from the placeholder's token onwards
FollowUp = Callable[[list[str]], list[Mapping[str, float]]]   # prefix texts -> top-k logprobs


class PromptToken(NamedTuple):
    start: int                      # character offset of the token in the prompt
    top: Mapping[str, float]        # next-token string -> logprob at this position ({} for the first)


def token_covering(tokens: Sequence[PromptToken], c: int, prompt_length: int) -> int:
    """Index of the token whose text covers character ``c`` (the last of equal starts)."""
    j = bisect_right([t.start for t in tokens], c) - 1
    if j < 1 or c >= prompt_length or not tokens[j].top:
        raise Unscorable(f"No scored prompt token covers placeholder offset {c}.")
    return j


def to_probs(top: Mapping[str, float]) -> dict[str, float]:
    return {t: math.exp(lp) for t, lp in top.items()}


def next_token(dist: Mapping[str, float], rest: str) -> str | None:
    """The token that starts ``rest``: ``rest`` itself if known, else the longest known proper
    prefix, else None (truncated away)."""
    if rest in dist:
        return rest
    prefixes = [t for t in dist if t and len(t) < len(rest) and rest.startswith(t)]
    return max(prefixes, key=len) if prefixes else None


@dataclass
class Placeholder:
    """The candidates' token paths at one placeholder, grown as distributions arrive."""

    context: str                                # prompt text before the covering token
    rest: list[str]                             # per candidate: text not yet tokenised
    paths: list[TokenPath]                           # per candidate: token strings so far
    dead: list[bool]                            # per candidate: fell outside a top-k
    dists: dict[TokenPath, dict[str, float]] = field(default_factory=dict)  # next-token probs

    def advance(self) -> list[TokenPath]:
        """Extend every candidate as far as the known distributions go; return the paths whose
        distribution is still needed."""
        needed: list[TokenPath] = []
        for k in range(len(self.rest)):
            while self.rest[k] and not self.dead[k]:
                dist = self.dists.get(self.paths[k])
                if dist is None:
                    if self.paths[k] not in needed:
                        needed.append(self.paths[k])
                    break
                tok = next_token(dist, self.rest[k])
                if tok is None:
                    self.dead[k] = True
                    break
                self.paths[k] += (tok,)
                self.rest[k] = self.rest[k][len(tok):]
        return needed

    def probs(self) -> list[float]:
        """Unnormalised candidate probabilities (0 for dead or unfinished candidates)."""
        live = [k for k in range(len(self.rest)) if not self.dead[k] and not self.rest[k]]
        out = [0.0] * len(self.rest)
        if live:
            root = build_trie([list(self.paths[k]) for k in live])
            for k, p in zip(live, candidate_probs(root, len(live), self.dists)):
                out[k] = p
        return out


def placeholder(prompt: str, tokens: Sequence[PromptToken], c: int,
                candidates: Sequence[str]) -> Placeholder:
    j = token_covering(tokens, c, len(prompt))
    start = tokens[j].start
    lead = prompt[start:c]
    return Placeholder(prompt[:start], [lead + s for s in candidates], [()] * len(candidates),
                       [False] * len(candidates), {(): to_probs(tokens[j].top)})


def normalise(p: Sequence[float]) -> tuple[tuple[float, ...], float]:
    total = float(sum(p))
    return (tuple(x / total for x in p) if total > 0 else tuple(p)), total


def score_prompt(request: PromptLogprobRequest, tokens: Sequence[PromptToken], follow_up: FollowUp,
          max_rounds: int = 3) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]:
    """Distributions over ``request.candidates`` at each of ``request.positions``: (probs, mass).

    ``follow_up`` is called once per round (at most ``max_rounds``; one round for "10" = "1"+"0")
    with the distinct prefix texts whose next-token distribution is needed; candidates still
    unfinished after the last round get 0."""
    states = [placeholder(request.prompt, tokens, c, request.candidates) for c in request.positions]
    for _ in range(max_rounds):
        wanted = [(s, path) for s in states for path in s.advance()]
        if not wanted:
            break
        texts = list(dict.fromkeys(s.context + "".join(path) for s, path in wanted))
        answers = follow_up(texts)
        if len(answers) != len(texts):
            raise ValueError(f"follow_up answered {len(answers)} of {len(texts)} prefixes.")
        by_text = dict(zip(texts, answers))
        for s, path in wanted:
            s.dists[path] = to_probs(by_text[s.context + "".join(path)])
    else:  # the last round's answers still extend the paths; nothing more is asked
        for s in states:
            s.advance()
    probs, mass = zip(*(normalise(s.probs()) for s in states)) if states else ((), ())
    return tuple(probs), tuple(mass)
