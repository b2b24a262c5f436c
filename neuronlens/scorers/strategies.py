"""Simulation strategies for backends without prompt logprobs: requests and pure answer parsers.

Each strategy turns one excerpt into request(s) that share the neuron's prompt (instructions,
few-shot examples, explanation) and reads the answers back as distributions over "0".."10":

- ``one_at_a_time``: one request per token, its listing cut after that token's tab; the
  distribution is the first generated token's top logprobs. Exact, one call per token.
- ``generated_sequence``: one request per excerpt; the model copies the excerpt writing
  ``token<TAB>N`` lines, and each N's distribution is read from the top logprobs of the generated
  token that writes it. The copied tokens must match the real ones, line for line.
- ``json``: no logprobs at all; the model answers a JSON list of integers, read as one-hot.

Reading numbers from top logprobs: alternatives are matched after stripping whitespace, so
" 7" and "7" both count as 7; probability on anything else is dropped and the rest renormalised.
Where the tokenizer has no single token "10" (digits split one by one), a first token "1" cannot
tell 1 from 10. One rule in both strategies that generate: when the answer writes a "1", the token
written after it splits that mass between 1 and 10 by the probability of a following "0"
(``one_at_a_time`` generates two tokens for this). The local and vLLM backends score "10" exactly
(all_at_once follows every multi-token candidate).

A parser that cannot read an answer raises ``Unreadable`` with the reason; the engine counts the
excerpt as failed and keeps the reason, never a silent zero.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

from neuronlens.backends.base import Completion, GenerateRequest, Message, TokenLogprob
from neuronlens.prompt_format import format_token

NUMBERS = tuple(str(i) for i in range(11))
TOP_LOGPROBS = 20
UNKNOWN = "unknown"
END = "<end>"

# Our own words; the shared prompt ends with the "<start>" line of the neuron being simulated.
ONE_RULE = "Answer with one whole number from 0 to 10 and nothing else."
ONE_ASK = ("Reply with only the activation, a whole number from 0 to 10, of the last token listed "
           "above ({token}).")
SEQUENCE_RULE = ("Answer by copying the excerpt's lines exactly, in order, one token per line, "
                 "with your predicted activation after the tab in place of \"unknown\"; nothing "
                 "else.")
SEQUENCE_ASK = ("Copy the {n} lines of the excerpt above, replacing each \"unknown\" with your "
                "predicted activation, a whole number from 0 to 10. Reply with exactly those "
                "{n} lines: each token exactly as shown, a tab, then the number.")
SEQUENCE_CUE = "The same excerpt, with every activation predicted:\n<start>\n"
JSON_RULE = "Answer with a JSON list of whole numbers from 0 to 10 and nothing else."
JSON_ASK = ("Reply with a JSON list of {n} whole numbers from 0 to 10: the predicted activation of "
            "each token of the excerpt above, in order.")
JSON_CUE = "The {n} activations above, predicted, as a JSON list:\n["


class Unreadable(Exception):
    """An answer that does not give a distribution for every token; the message says why."""

    kind = "unreadable"


@dataclass(frozen=True)
class SharedPrompt:
    """The prompt every excerpt of a neuron shares, in both forms.

    ``completion``: the whole text prompt up to the excerpt (it ends with "<start>\\n");
    ``system`` and ``body``: the same split for chat, instructions apart from the examples and the
    explanation (``body`` ends with "<start>\\n" too); ``chat``: send messages, not a prompt."""

    completion: str
    system: str
    body: str
    chat: bool

    def request(self, listing: str, rule: str, ask: str, cue: str = "", *, max_tokens: int,
                top_logprobs: int = 0, stop: tuple[str, ...] = ()) -> GenerateRequest:
        """Chat: the rule joins the system message, the ask follows the listing. Completion: the
        listing, then ``cue`` (which the model continues)."""
        if self.chat:
            messages = (Message("system", f"{self.system}\n\n{rule}"),
                        Message("user", f"{self.body}{listing}\n\n{ask}"))
            return GenerateRequest(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                   top_logprobs=top_logprobs, stop=stop)
        return GenerateRequest(prompt=self.completion + listing + cue, max_tokens=max_tokens,
                               temperature=0.0, top_logprobs=top_logprobs, stop=stop)


def unknown_lines(tokens: Sequence[str]) -> str:
    return "".join(f"{format_token(t)}\t{UNKNOWN}\n" for t in tokens)


# ---- reading a number from top logprobs --------------------------------------------------------

def alternatives(logprob: TokenLogprob) -> tuple[tuple[str, float], ...]:
    """The token's top alternatives; the token itself where the backend gave none."""
    return logprob.top or ((logprob.token, logprob.logprob),)


def number_mass(alts: Sequence[tuple[str, float]]) -> list[float]:
    """Probability on each of "0".."10" (whitespace around a token ignored), not normalised."""
    mass = [0.0] * len(NUMBERS)
    for text, lp in alts:
        s = text.strip()
        if s in NUMBERS:
            mass[int(s)] += math.exp(lp)
    return mass


def normalised(mass: Sequence[float], where: str) -> tuple[float, ...]:
    total = sum(mass)
    if not total > 0:
        raise Unreadable(f"no probability on any of 0-10 {where}")
    return tuple(m / total for m in mass)


def split_one_and_ten(mass: list[float], after_one: TokenLogprob) -> list[float]:
    """Given the token written after a "1", split the mass on "1" between 1 and 10: a next
    token starting with "0" makes 10, another digit a number above 10 (dropped), else 1."""
    zero = other_digit = 0.0
    for text, lp in alternatives(after_one):
        if text[:1] == "0":
            zero += math.exp(lp)
        elif text[:1].isdigit():
            other_digit += math.exp(lp)
    one = mass[1]
    mass = list(mass)
    mass[1] = one * max(0.0, 1.0 - zero - other_digit)
    mass[10] += one * zero
    return mass


# ---- one_at_a_time ------------------------------------------------------------------------------

def one_at_a_time_request(shared: SharedPrompt, tokens: Sequence[str], i: int) -> GenerateRequest:
    """The listing up to token ``i``, earlier activations "unknown", ending with token i's tab."""
    listing = unknown_lines(tokens[:i]) + f"{format_token(tokens[i])}\t"
    return shared.request(listing, ONE_RULE, ONE_ASK.format(token=repr(format_token(tokens[i]))),
                          max_tokens=2, top_logprobs=TOP_LOGPROBS)   # 2: a "1" may go on to "10"


def parse_one(completion: Completion) -> tuple[float, ...]:
    """The distribution at the first generated token; where that token is "1", the token after
    it splits the mass on 1 between 1 and 10 (the rule of ``generated_sequence`` too)."""
    if not completion.logprobs:
        raise Unreadable("the answer came without logprobs")
    first = completion.logprobs[0]
    mass = number_mass(alternatives(first))
    if first.token.strip() == "1" and len(completion.logprobs) > 1:
        mass = split_one_and_ten(mass, completion.logprobs[1])
    return normalised(mass, "in the answer")


# ---- generated_sequence -------------------------------------------------------------------------

def sequence_request(shared: SharedPrompt, tokens: Sequence[str]) -> GenerateRequest:
    n = len(tokens)
    return shared.request(unknown_lines(tokens) + END + "\n", SEQUENCE_RULE,
                          SEQUENCE_ASK.format(n=n), "\n" + SEQUENCE_CUE,
                          max_tokens=6 * n + 16, top_logprobs=TOP_LOGPROBS, stop=(END,))


@dataclass(frozen=True)
class _Line:
    token: str        # the token text as written
    number: str       # the text after the tab, stripped
    offset: int       # character offset of the number in the generated text


def _lines(text: str) -> list[_Line]:
    """The ``token<TAB>N`` lines of a generated listing: lines before the first one ("<start>",
    a preamble) are skipped; the listing ends at "<end>" or the first other non-empty line."""
    out, offset = [], 0
    for raw in text.split("\n"):
        start, offset = offset, offset + len(raw) + 1
        line = raw.rstrip("\r")
        if line.strip() == END:
            break
        if "\t" not in line:
            if out and line.strip():
                break
            continue
        token, _, number = line.rpartition("\t")
        lead = len(number) - len(number.lstrip())
        out.append(_Line(token, number.strip(), start + len(token) + 1 + lead))
    return out


def parse_sequence(completion: Completion, tokens: Sequence[str]) -> tuple[tuple[float, ...], ...]:
    """Per real token, the distribution of the number written on its line.

    The generated tokens are laid end to end to know each one's character span; a line's number
    is read from the top alternatives of the generated token where the number starts. The lines'
    tokens must be ``format_token`` of the real tokens, same order, same count."""
    if not completion.logprobs:
        raise Unreadable("the answer came without logprobs")
    generated = completion.logprobs
    starts = list(accumulate((len(g.token) for g in generated), initial=0))
    lines = _lines("".join(g.token for g in generated))
    for k, (line, real) in enumerate(zip(lines, tokens)):
        if line.token != format_token(real):
            raise Unreadable(f"misaligned: line {k + 1} copies {line.token!r} where the token "
                             f"is {format_token(real)!r}")
    if len(lines) != len(tokens):
        cut = " (truncated at max_tokens)" if completion.finish_reason == "length" else ""
        raise Unreadable(f"misaligned: {len(lines)} lines for {len(tokens)} tokens{cut}")
    dists = []
    for k, line in enumerate(lines):
        if line.number not in NUMBERS:
            raise Unreadable(f"line {k + 1} gives {line.number!r}, not a whole number 0-10")
        g = bisect.bisect_right(starts, line.offset) - 1
        mass = number_mass(alternatives(generated[g]))
        if generated[g].token.lstrip() == "1" and g + 1 < len(generated):
            mass = split_one_and_ten(mass, generated[g + 1])
        dists.append(normalised(mass, f"at line {k + 1}"))
    return tuple(dists)


# ---- json (no logprobs) --------------------------------------------------------------------------

def json_request(shared: SharedPrompt, tokens: Sequence[str]) -> GenerateRequest:
    n = len(tokens)
    return shared.request(unknown_lines(tokens) + END + "\n", JSON_RULE, JSON_ASK.format(n=n),
                          "\n" + JSON_CUE.format(n=n), max_tokens=4 * n + 16,
                          stop=() if shared.chat else ("]",))


_ARRAY = re.compile(r"\[[^\[\]]*\]")


def parse_json(completion: Completion, n: int, prefilled: bool) -> tuple[int, ...]:
    """The first JSON array in the answer (after the "[" the completion prompt ends with, when
    ``prefilled``): ``n`` whole numbers from 0 to 10."""
    text = completion.text
    if prefilled:  # the prompt ends with "[" and stops at "]", which the answer then lacks
        text = "[" + text + ("]" if completion.finish_reason == "stop" and "]" not in text else "")
    match = _ARRAY.search(text)
    if match is None:
        cut = " (truncated at max_tokens)" if completion.finish_reason == "length" else ""
        raise Unreadable(f"no JSON list in the answer{cut}")
    try:
        values = json.loads(match.group())
    except ValueError:
        raise Unreadable(f"the list {match.group()[:40]!r} is not valid JSON") from None
    if len(values) != n:
        raise Unreadable(f"the list has {len(values)} numbers for {n} tokens")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == int(v)
               and 0 <= v <= 10 for v in values):
        raise Unreadable("the list holds something other than whole numbers from 0 to 10")
    return tuple(int(v) for v in values)


def one_hot(value: int) -> tuple[float, ...]:
    return tuple(1.0 if i == value else 0.0 for i in range(len(NUMBERS)))
