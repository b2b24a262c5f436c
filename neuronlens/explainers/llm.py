"""Explain a neuron: show an LLM its top-activating excerpts and let it finish a sentence.

The explainer sees excerpts as `token<TAB>activation` lines, activations scaled to whole numbers
0-10, after a few hand-made examples, and completes "the main thing this neuron does is find".
Formatting and parsing are pure functions; `LLMExplainer` only fits the prompt to the backend's
context, sends one request for `n` candidates and counts the ones that parse to nothing.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Sequence

from neuronlens.backends.base import Backend, GenerateRequest, Generation, Message
from neuronlens.errors import UserError
from neuronlens.explainers.base import Explainer, ExplanationResult
from neuronlens.prompt_format import PHRASE, format_token, normalize_activations
from neuronlens.records import ActivationRecord, NeuronId

INSTRUCTIONS = f"""\
We are studying the neurons of a language model. A neuron reads text one token at a time and \
gives, at each token, an activation: how strongly it responds there.

Each neuron below is shown through a few text excerpts. An excerpt begins with a <start> line \
and ends with an <end> line; in between is one token per line: the token, a tab, then the \
neuron's activation on it, scaled to a whole number from 0 (no response) to 10 (the strongest \
response in these excerpts). When only a few tokens of an excerpt respond, a short list after it \
repeats just the tokens with non-zero activations.

Work out what makes the neuron respond, looking hardest at the tokens with high activations, and \
say it in a short phrase that completes the sentence "{PHRASE} ..."."""

CHAT_RULES = (f'Reply with only the words that complete "{PHRASE} ...": one short line, '
              "no preamble, without repeating the start of the sentence.")
CHAT_ASK = f"Complete the sentence: {PHRASE}"
NONZERO_HEADING = "Non-zero activations in the excerpt above:"
OUTPUT_HEADING = "Its output raises the next-token logits of"
N_OUTPUT_TOKENS = 10
CHAT_MESSAGE_TOKENS = 4     # allowance per chat message for role and separators
SPARSE_FRACTION = 0.2       # below this fraction of non-zero tokens, repeat the non-zero ones


def _rec(pairs: Sequence[tuple[str, float]]) -> ActivationRecord:
    return ActivationRecord([t for t, _ in pairs], [float(a) for _, a in pairs])


# Hand-made neurons, already on the 0-10 scale: (excerpts, explanation).
Example = tuple[Sequence[ActivationRecord], str]
NEAR_COPY = 0.85   # SequenceMatcher ratio from which two explanations count as one (one word apart)
FEWSHOT: tuple[Example, ...] = (
    ((_rec([("We", 0), (" met", 0), (" in", 0), (" early", 1), (" March", 10), (" and", 0),
            (" again", 0), (" in", 0), (" May", 9), (".", 0)]),
      _rec([("The", 0), (" report", 0), (" is", 0), (" due", 0), (" by", 0), (" the", 0),
            (" end", 0), (" of", 0), (" September", 10), (" at", 0), (" the", 0),
            (" latest", 0)])),
     "months of the year"),
    ((_rec([("print", 0), ("(", 0), ("len", 0), ("(", 0), ("items", 0), (")", 10), (")", 9)]),
      _rec([("x", 0), (" =", 0), (" [", 0), ("1", 0), (",", 0), (" 2", 0), ("]", 7), (" +", 0),
            (" f", 0), ("(", 0), ("y", 0), (")", 10)])),
     "closing brackets and parentheses in code"),
    ((_rec([("She", 0), (" sliced", 6), (" the", 0), (" onions", 2), (" and", 0),
            (" fried", 10), (" them", 0), (" in", 0), (" butter", 3), (".", 0)]),),
     "words about cooking and preparing food"),
)


def format_record(record: ActivationRecord, max_activation: float) -> str:
    """One excerpt between <start>/<end>, plus its non-zero tokens again when few of them fire."""
    values = normalize_activations(record.activations, max_activation)
    lines = [f"{format_token(t)}\t{v}" for t, v in zip(record.tokens, values)]
    text = "\n".join(["<start>", *lines, "<end>"])
    nonzero = [line for line, v in zip(lines, values) if v > 0]
    if nonzero and len(nonzero) < SPARSE_FRACTION * len(lines):
        text += "\n" + "\n".join([NONZERO_HEADING, *nonzero])
    return text


def format_output(logits: dict) -> str:
    """The tokens a neuron's output promotes and suppresses, as one line."""
    quoted = lambda side: ", ".join(f'"{format_token(t)}"' for t, _ in logits[side][:N_OUTPUT_TOKENS])  # noqa: E731
    return f"{OUTPUT_HEADING} {quoted('promoted')}; it lowers those of {quoted('suppressed')}."


def format_neuron(label: int, records: Sequence[ActivationRecord], max_activation: float,
                  logits: dict | None = None) -> str:
    body = "\n".join(format_record(r, max_activation) for r in records)
    output = f"\n{format_output(logits)}" if logits else ""
    return f"Neuron {label}\nActivations:\n{body}{output}"


def completion_prompt(fewshot: Sequence[tuple[Sequence[ActivationRecord], str]],
                      records: Sequence[ActivationRecord], max_activation: float,
                      logits: dict | None = None) -> str:
    """One text ending in "... the main thing this neuron does is find"."""
    parts = [INSTRUCTIONS]
    for i, (excerpts, explanation) in enumerate(fewshot, start=1):
        parts.append(f"{format_neuron(i, excerpts, 10.0)}\n"
                     f"Explanation of neuron {i}: {PHRASE} {explanation}.")
    label = len(fewshot) + 1
    parts.append(f"{format_neuron(label, records, max_activation, logits)}\n"
                 f"Explanation of neuron {label}: {PHRASE}")
    return "\n\n".join(parts)


def chat_messages(fewshot: Sequence[tuple[Sequence[ActivationRecord], str]],
                  records: Sequence[ActivationRecord],
                  max_activation: float, logits: dict | None = None) -> tuple[Message, ...]:
    """System instructions, each example as a user/assistant pair, then the target neuron."""
    messages = [Message("system", f"{INSTRUCTIONS}\n\n{CHAT_RULES}")]
    for i, (excerpts, explanation) in enumerate(fewshot, start=1):
        messages.append(Message("user", f"{format_neuron(i, excerpts, 10.0)}\n\n{CHAT_ASK}"))
        messages.append(Message("assistant", explanation))
    label = len(fewshot) + 1
    target = format_neuron(label, records, max_activation, logits)
    messages.append(Message("user", f"{target}\n\n{CHAT_ASK}"))
    return tuple(messages)


REVISE_INSTRUCTIONS = f"""\
We are studying the neurons of a language model. A neuron reads text one token at a time and \
gives, at each token, an activation: how strongly it responds there.

A neuron was given an explanation, and a reader then predicted the neuron's activations from that \
explanation alone. Below are the excerpts where the prediction was furthest off. An excerpt begins \
with a <start> line and ends with an <end> line; in between is one token per line: the token, a \
tab, the neuron's true activation, a tab, then the predicted one, both on a scale from 0 (no \
response) to 10 (its strongest response).

Look at where the two disagree most: tokens the explanation missed, and tokens it wrongly covers. \
Then say, in a short phrase that completes the sentence "{PHRASE} ...", a better explanation."""
REVISION_EXCERPTS = 4   # the train excerpts with the largest misses shown to a revision


def format_miss(record: ActivationRecord, predicted: Sequence[float], max_activation: float) -> str:
    """One excerpt between <start>/<end>: each token with its true and its predicted activation."""
    values = normalize_activations(record.activations, max_activation)
    lines = [f"{format_token(t)}\t{v}\t{round(p)}" for t, v, p in zip(record.tokens, values, predicted)]
    return "\n".join(["<start>", *lines, "<end>"])


def revision_body(explanation: str, misses: Sequence[tuple[ActivationRecord, Sequence[float]]]) -> str:
    top = max(r.max_activation for r, _ in misses)
    shown = "\n".join(format_miss(r, p, top) for r, p in misses)
    return (f"Current explanation: {PHRASE} {explanation}.\n"
            f"Activations (token, true, predicted):\n{shown}")


_RESTATED = re.compile(r"^\W*" + re.escape(PHRASE) + r"\W*?\s", re.IGNORECASE)


def parse_explanation(text: str) -> str:
    """The explanation in a completion; "" when there is none (a failure, to be counted)."""
    text = _RESTATED.sub("", text.strip() + " ", count=1).strip()
    first = text.splitlines()[0] if text else ""
    return " ".join(first.strip().removesuffix(".").split())


def usable_explanations(generation: Generation) -> bool:
    """An answer worth caching: at least one completion parses to an explanation."""
    return any(parse_explanation(c.text) for c in generation.completions)


@dataclass(frozen=True)
class _Fitted:
    request: GenerateRequest
    n_records: int
    n_fewshot: int
    n_records_dropped: int
    n_lines_truncated: int


class LLMExplainer(Explainer):
    """Turns a neuron's top excerpts (train split) into `n` candidate explanations."""

    FORMATS = ("auto", "chat", "completion")

    def __init__(self, backend: Backend, n: int = 1, max_records: int = 10, max_tokens: int = 60,
                 temperature: float | None = None, prompt_format: str = "auto",
                 seed: int = 0, show_logits: bool = False, revisions: int = 0) -> None:
        if not isinstance(backend, Backend):
            raise UserError(f"The explainer needs a Backend, not {type(backend).__name__}.")
        if n < 1 or max_records < 1 or max_tokens < 1 or revisions < 0:
            raise UserError(f"n, max_records and max_tokens must be at least 1 and revisions 0 or more "
                             f"(got {n}, {max_records}, {max_tokens}, {revisions}).")
        if temperature is not None and temperature < 0:
            raise UserError(f"temperature must be 0 or more (got {temperature}).")
        if prompt_format not in self.FORMATS:
            raise UserError(f"prompt_format must be one of {', '.join(self.FORMATS)} "
                             f"(got {prompt_format!r}).")
        self.backend, self.n = backend, n
        self.max_records, self.max_tokens = max_records, max_tokens
        self.temperature = temperature if temperature is not None else (1.0 if n > 1 else 0.0)
        self.prompt_format, self.seed = prompt_format, seed
        self.show_logits, self.revisions = show_logits, revisions
        self.outputs: dict[NeuronId, dict] = {}   # per neuron, its logits (``show_logits``)
        self.resolve_format()  # a format the backend lacks fails now, not at the first neuron

    def resolve_format(self) -> str:
        """The prompt format used with this backend: "chat" or "completion".

        ``auto`` prefers the completion prompt, which ends mid-sentence so that any model (even a
        small one) continues it; chat-only backends get the chat prompt."""
        caps = self.backend.capabilities
        if self.prompt_format == "auto":
            if caps.chat or caps.completion:
                return "completion" if caps.completion else "chat"
            raise UserError(f"The {self.backend.name} backend offers neither chat nor completion.")
        if not getattr(caps, self.prompt_format):
            raise UserError(f"The {self.backend.name} backend has no {self.prompt_format} "
                             f"format; use prompt_format='auto' or another backend.")
        return self.prompt_format

    def _request(self, fewshot: Sequence[tuple[Sequence[ActivationRecord], str]],
                 records: Sequence[ActivationRecord], max_activation: float,
                 logits: dict | None = None) -> tuple[GenerateRequest, int]:
        """The request and its prompt's token count."""
        if self.resolve_format() == "chat":
            return self._sized(chat_messages(fewshot, records, max_activation, logits),
                               temperature=self.temperature, n=self.n)
        return self._sized(prompt=completion_prompt(fewshot, records, max_activation, logits),
                           temperature=self.temperature, n=self.n)

    def _sized(self, messages: Sequence[Message] = (), prompt: str | None = None,
               **options: Any) -> tuple[GenerateRequest, int]:
        """A chat (``messages``) or completion (``prompt``, one line) request and its prompt's
        token count."""
        tokens = (sum(self.backend.count_tokens(m.content) + CHAT_MESSAGE_TOKENS for m in messages)
                  if messages else self.backend.count_tokens(prompt or ""))
        return GenerateRequest(messages=tuple(messages), prompt=prompt, max_tokens=self.max_tokens,
                               seed=self.seed, stop=() if messages else ("\n",), **options), tokens

    def _fit(self, records: Sequence[ActivationRecord], fewshot: Sequence[Example] = FEWSHOT,
             logits: dict | None = None) -> _Fitted:
        if not records:
            raise UserError("A neuron needs at least one activation record to be explained.")
        shown = list(records[: self.max_records])
        max_activation = max(r.max_activation for r in shown)
        budget = self.backend.capabilities.context_length - self.max_tokens
        n_fewshot = len(fewshot)

        def attempt() -> tuple[GenerateRequest, bool]:
            request, tokens = self._request(fewshot[:n_fewshot], shown, max_activation, logits)
            return request, tokens <= budget

        request, fits = attempt()
        while not fits and (n_fewshot > 0 or len(shown) > 1):
            if n_fewshot > 0:
                n_fewshot -= 1  # the last example goes first
            else:
                shown.remove(min(shown, key=lambda r: r.max_activation))
            request, fits = attempt()
        n_lines_truncated = 0
        if not fits:  # one excerpt, no examples: keep the longest window around its peak that fits
            whole = shown[0]
            peak = max(range(len(whole.activations)), key=whole.activations.__getitem__, default=0)
            best, lo, hi = 1, 2, len(whole.tokens) - 1
            while lo <= hi:  # binary search on the window's length
                mid = (lo + hi) // 2
                shown = [_window(whole, peak, mid)]
                if attempt()[1]:
                    best, lo = mid, mid + 1
                else:
                    hi = mid - 1
            shown = [_window(whole, peak, best)]
            request, _ = attempt()  # sent even if one token is still too long: never crash
            n_lines_truncated = len(whole.tokens) - len(shown[0].tokens)
        return _Fitted(request, len(shown), n_fewshot,
                       min(len(records), self.max_records) - len(shown), n_lines_truncated)

    def build_request(self, records: Sequence[ActivationRecord]) -> GenerateRequest:
        """The request for `records` (most active first), fitted to the backend's context."""
        return self._fit(records).request

    def explain(self, neuron: NeuronId, records: Sequence[ActivationRecord]) -> ExplanationResult:
        """Explanations of the neuron shown by ``records`` (its train excerpts); an LLM sees only
        the excerpts, never the id.

        An answer that copies one of the few-shot answers says nothing about this neuron: the
        request is made again without the examples it copied (small models copy the first one
        often), until no answer copies one. Copies replaced so are counted."""
        fewshot, replaced = list(FEWSHOT), 0
        prompt_tokens = completion_tokens = 0
        while True:
            fitted = self._fit(records, fewshot, self.outputs.get(neuron) if self.show_logits else None)
            generation = self.backend.generate_usable(fitted.request, usable_explanations)
            prompt_tokens += generation.usage.prompt_tokens
            completion_tokens += generation.usage.completion_tokens
            parsed = [parse_explanation(c.text) for c in generation.completions]
            copied = {c for p in parsed if p for c in [copied_example(p, fewshot[:fitted.n_fewshot])]
                      if c is not None}
            if not copied:
                break
            replaced += sum(1 for p in parsed if p and copied_example(p, fewshot[:fitted.n_fewshot]))
            fewshot = [example for example in fewshot if example[1] not in copied]
        explanations = tuple(dict.fromkeys(p for p in parsed if p))
        return ExplanationResult(
            explanations=explanations,
            n_failed=sum(1 for p in parsed if not p),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            n_records_shown=fitted.n_records,
            n_fewshot_used=fitted.n_fewshot,
            n_records_dropped=fitted.n_records_dropped,
            n_fewshot_dropped=len(fewshot) - fitted.n_fewshot,   # to fit the context
            n_lines_truncated=fitted.n_lines_truncated,
            n_copies_replaced=replaced,
        )


    def revise(self, neuron: NeuronId, explanation: str,
               misses: Sequence[tuple[ActivationRecord, Sequence[float]]]) -> ExplanationResult:
        """A revised explanation, from the current one and excerpts the explainer was already shown
        (``misses``: each with the activations simulated from ``explanation``, 0-10), greedy."""
        misses = list(misses[:REVISION_EXCERPTS])
        budget = self.backend.capabilities.context_length - self.max_tokens
        while True:   # the largest misses first; the smallest go first when the context is short
            body = revision_body(explanation, misses)
            request, tokens = (
                self._sized((Message("system", f"{REVISE_INSTRUCTIONS}\n\n{CHAT_RULES}"),
                             Message("user", f"{body}\n\n{CHAT_ASK}")))
                if self.resolve_format() == "chat" else
                self._sized(prompt=f"{REVISE_INSTRUCTIONS}\n\n{body}\nBetter explanation: {PHRASE}"))
            if tokens <= budget or len(misses) == 1:
                break
            misses.pop()
        generation = self.backend.generate_usable(request, usable_explanations)
        parsed = [parse_explanation(c.text) for c in generation.completions]
        return ExplanationResult(explanations=tuple(dict.fromkeys(p for p in parsed if p)),
                                 n_failed=sum(1 for p in parsed if not p),
                                 prompt_tokens=generation.usage.prompt_tokens,
                                 completion_tokens=generation.usage.completion_tokens,
                                 n_records_shown=len(misses))


def words(text: str) -> str:
    """``text`` lowercased, as its words only (for comparing explanations)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def near(a: str, b: str) -> bool:
    """Whether two explanations are the same or nearly (one word changed, say)."""
    a, b = words(a), words(b)
    return a == b or difflib.SequenceMatcher(None, a, b).ratio() >= NEAR_COPY


def copied_example(explanation: str, fewshot: Sequence[Example] = FEWSHOT) -> str | None:
    """The few-shot answer ``explanation`` copies (exactly or nearly), or None."""
    return next((answer for _, answer in fewshot if near(explanation, answer)), None)


def copy_flag(explanation: str) -> str | None:
    """Why an explanation says nothing of its own: it copies a few-shot answer, or repeats a
    phrase of the instructions; None when it does neither."""
    if (answer := copied_example(explanation)) is not None:
        return f"copies the example answer {answer!r}"
    said = words(explanation)
    if len(said.split()) >= 3 and f" {said} " in f" {words(INSTRUCTIONS)} ":
        return "repeats the instructions"
    return None


def _window(record: ActivationRecord, peak: int, length: int) -> ActivationRecord:
    """`length` consecutive tokens of `record` around position `peak`."""
    start = max(0, min(peak - length // 2, len(record.tokens) - length))
    return ActivationRecord(record.tokens[start:start + length],
                            record.activations[start:start + length])
