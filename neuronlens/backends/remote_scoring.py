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

Skipping follow-ups (opt-in, ``bound`` > 0): a follow-up only splits the mass of its path
between the candidate that ends there ("1") and the longer ones ("10"). Where that mass is so
small that giving all of it to the shorter candidate moves the expected value by at most
``bound`` (P(path) x the largest value gap / the placeholder's total mass), the follow-up is not
asked and that bound is reported for the placeholder; 0 means exact.

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
from neuronlens.errors import UserError

TokenPath = tuple[str, ...]   # token strings from the placeholder's token onwards
FollowUp = Callable[[list[str]], list[Mapping[str, float]]]   # prefix texts -> top-k logprobs


class PromptToken(NamedTuple):
    start: int                      # character offset of the token in the prompt
    top: Mapping[str, float]        # next-token string -> logprob at this position ({} for the first)


def covering(starts: Sequence[int], c: int, prompt_length: int) -> int | None:
    """Index of the token (by the tokens' start offsets) whose text covers character ``c``, the
    last of equal starts; None where that is the first token or ``c`` is past the prompt (no
    distribution predicts it)."""
    j = bisect_right(starts, c) - 1
    return j if j >= 1 and c < prompt_length else None


def token_covering(tokens: Sequence[PromptToken], c: int, prompt_length: int) -> int:
    """Index of the token whose text covers character ``c`` (``covering``), which must have
    been scored."""
    j = covering([t.start for t in tokens], c, prompt_length)
    if j is None or not tokens[j].top:
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

    def path_prob(self, path: TokenPath) -> float:
        """The probability of the tokens ``path`` at this placeholder."""
        p = 1.0
        for d in range(len(path)):
            p *= self.dists[path[:d]].get(path[d], 0.0)
        return p

    def skip_bound(self, path: TokenPath, values: Sequence[float]) -> float | None:
        """How far the expected value can move if ``path``'s follow-up is skipped, its whole mass
        given to the candidate that ends at ``path``. Only where every live candidate is one
        token so far and each of those tokens ends a candidate ("1" of "10"), so that the
        placeholder's total mass is known already; None elsewhere (a merged lead, say)."""
        live = [k for k in range(len(self.rest)) if not self.dead[k]]
        if any(len(self.paths[k]) != 1 for k in live):
            return None
        firsts = {self.paths[k] for k in live}
        if firsts != {self.paths[k] for k in live if not self.rest[k]}:
            return None
        ending = [k for k in live if self.paths[k] == path and not self.rest[k]]
        waiting = [k for k in live if self.paths[k] == path and self.rest[k]]
        total = sum(self.path_prob(first) for first in firsts)
        if not waiting or total <= 0:
            return None
        gap = max(abs(values[k] - values[ending[0]]) for k in waiting)
        return self.path_prob(path) * gap / total

    def skip(self, path: TokenPath) -> None:
        """Give up the candidates that continue past ``path`` (their mass stays with the one
        that ends there)."""
        for k in range(len(self.rest)):
            if self.paths[k] == path and self.rest[k]:
                self.dead[k] = True

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


class Scored(NamedTuple):
    probs: tuple[tuple[float, ...], ...]   # per placeholder, over the candidates, renormalised
    mass: tuple[float, ...]                # per placeholder, before renormalising
    bound: tuple[float, ...]               # per placeholder, the skipped follow-ups' bound (0: exact)


def check_bound(bound: float) -> float:
    if not 0 <= bound <= 10:
        raise UserError(f"follow_up_bound is a shift of the expected value on the 0-10 scale: 0 "
                        f"(exact) up to 10, got {bound}.")
    return float(bound)


def bound_identity(bound: float) -> dict:
    """The bound in a backend's identity (the response cache's key), only when it skips."""
    return {"follow_up_bound": bound} if bound > 0 else {}


def candidate_values(candidates: Sequence[str]) -> list[float] | None:
    try:
        return [float(c) for c in candidates]
    except ValueError:
        return None


def score_prompt(request: PromptLogprobRequest, tokens: Sequence[PromptToken], follow_up: FollowUp,
                 max_rounds: int = 3, bound: float = 0.0,
                 known: Mapping[str, Mapping[str, float]] | None = None) -> Scored:
    """Distributions over ``request.candidates`` at each of ``request.positions``.

    ``follow_up`` is called once per round (at most ``max_rounds``; one round for "10" = "1"+"0")
    with the distinct prefix texts whose next-token distribution is needed; candidates still
    unfinished after the last round get 0. ``bound`` > 0 (numeric candidates only) skips the
    follow-ups that can move a placeholder's expected value by at most that much. ``known``:
    prefix texts whose next-token top-k came already (with the placeholder's own request), not
    asked again."""
    known = dict(known or {})
    states = [placeholder(request.prompt, tokens, c, request.candidates) for c in request.positions]
    values = candidate_values(request.candidates) if bound > 0 else None
    skipped = [0.0] * len(states)
    for _ in range(max_rounds):
        wanted = []
        for i, s in enumerate(states):
            for path in s.advance():
                shift = s.skip_bound(path, values) if values else None
                if shift is not None and skipped[i] + shift <= bound:   # the shifts add up
                    s.skip(path)
                    skipped[i] += shift
                else:
                    wanted.append((s, path))
        if not wanted:
            break
        texts = [t for t in dict.fromkeys(s.context + "".join(path) for s, path in wanted) if t not in known]
        answers = follow_up(texts) if texts else []
        if len(answers) != len(texts):
            raise ValueError(f"follow_up answered {len(answers)} of {len(texts)} prefixes.")
        known.update(zip(texts, answers))
        for s, path in wanted:
            s.dists[path] = to_probs(known[s.context + "".join(path)])
    else:  # the last round's answers still extend the paths; nothing more is asked
        for s in states:
            s.advance()
    probs, mass = zip(*(normalise(s.probs()) for s in states)) if states else ((), ())
    return Scored(tuple(probs), tuple(mass), tuple(skipped))
