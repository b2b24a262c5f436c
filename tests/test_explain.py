"""The explainer on a fake backend: golden prompt text, format choice, context fitting, parsing."""

from __future__ import annotations

import pytest

from neuronlens.backends.base import (
    Backend,
    Capabilities,
    Completion,
    GenerateRequest,
    Generation,
    Usage,
)
from neuronlens.explainers.llm import (
    FEWSHOT,
    NONZERO_HEADING,
    PHRASE,
    LLMExplainer,
    completion_prompt,
    format_record,
    parse_explanation,
)
from neuronlens.records import ActivationRecord, NeuronId

ID = NeuronId(0, 0)


class FakeBackend(Backend):
    """Records every request; answers with canned completions; a token is a whitespace word."""

    def __init__(self, *, chat: bool = True, completion: bool = True,
                 context_length: int = 1_000_000, replies: tuple[str, ...] = ("cats",)) -> None:
        self.capabilities = Capabilities(chat=chat, completion=completion,
                                         context_length=context_length)
        self.replies = replies
        self.requests: list[GenerateRequest] = []

    def generate(self, request: GenerateRequest) -> Generation:
        self.requests.append(request)
        texts = [self.replies[i % len(self.replies)] for i in range(request.n)]
        prompt = request.prompt or " ".join(m.content for m in request.messages)
        return Generation(tuple(Completion(t) for t in texts),
                          Usage(self.count_tokens(prompt), 3 * request.n))

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def rec(tokens: str, activations: list[float]) -> ActivationRecord:
    return ActivationRecord(tokens.split("|"), activations)


NEURON = [rec("The| cat| sat| down", [0, 4.0, 1.0, 0.0])]

GOLDEN_RECORD = "<start>\na\t0\n b\t2\n c\t5\n d\t10\n<end>"

GOLDEN_PROMPT = """\
We are studying the neurons of a language model. A neuron reads text one token at a time and \
gives, at each token, an activation: how strongly it responds there.

Each neuron below is shown through a few text excerpts. An excerpt begins with a <start> line \
and ends with an <end> line; in between is one token per line: the token, a tab, then the \
neuron's activation on it, scaled to a whole number from 0 (no response) to 10 (the strongest \
response in these excerpts). When only a few tokens of an excerpt respond, a short list after it \
repeats just the tokens with non-zero activations.

Work out what makes the neuron respond, looking hardest at the tokens with high activations, and \
say it in a short phrase that completes the sentence "the main thing this neuron does is find ...".

Neuron 1
Activations:
<start>
We\t0
 met\t0
 in\t0
 early\t1
 March\t10
 and\t0
 again\t0
 in\t0
 May\t9
.\t0
<end>
<start>
The\t0
 report\t0
 is\t0
 due\t0
 by\t0
 the\t0
 end\t0
 of\t0
 September\t10
 at\t0
 the\t0
 latest\t0
<end>
Non-zero activations in the excerpt above:
 September\t10
Explanation of neuron 1: the main thing this neuron does is find months of the year.

Neuron 2
Activations:
<start>
print\t0
(\t0
len\t0
(\t0
items\t0
)\t10
)\t9
<end>
<start>
x\t0
 =\t0
 [\t0
1\t0
,\t0
 2\t0
]\t7
 +\t0
 f\t0
(\t0
y\t0
)\t10
<end>
Non-zero activations in the excerpt above:
]\t7
)\t10
Explanation of neuron 2: the main thing this neuron does is find closing brackets and \
parentheses in code.

Neuron 3
Activations:
<start>
She\t0
 sliced\t6
 the\t0
 onions\t2
 and\t0
 fried\t10
 them\t0
 in\t0
 butter\t3
.\t0
<end>
Explanation of neuron 3: the main thing this neuron does is find words about cooking and \
preparing food.

Neuron 4
Activations:
<start>
The\t0
 cat\t10
 sat\t2
 down\t0
<end>
Explanation of neuron 4: the main thing this neuron does is find"""


# --- golden text -------------------------------------------------------------------------------

def test_format_record_golden() -> None:
    assert format_record(rec("a| b| c| d", [0, 2.5, 5, 10]), 10.0) == GOLDEN_RECORD


def test_format_record_normalises_negatives_and_escapes_newlines() -> None:
    text = format_record(rec("x|\n|y\tz", [-3.0, 2.0, 1.0]), 2.0)
    assert text == "<start>\nx\t0\n\\n\t10\ny\\tz\t5\n<end>"


def test_completion_prompt_golden() -> None:
    assert completion_prompt(FEWSHOT, NEURON, 4.0) == GOLDEN_PROMPT
    backend = FakeBackend(chat=False)
    assert LLMExplainer(backend).build_request(NEURON).prompt == GOLDEN_PROMPT


# --- repetition of non-zero tokens -------------------------------------------------------------

def test_few_firing_tokens_are_repeated() -> None:
    text = format_record(rec("a| b| c| d| e| f", [0, 0, 8.0, 0, 0, 0]), 8.0)
    assert text == "<start>\na\t0\n b\t0\n c\t10\n d\t0\n e\t0\n f\t0\n<end>\n" \
                   f"{NONZERO_HEADING}\n c\t10"


@pytest.mark.parametrize("activations", [[0, 1.0, 2.0, 3.0], [1.0, 0, 0, 0, 0],
                                         [0.0, 0.0, 0.0, 0.0]])
def test_no_repetition_when_many_fire_or_none(activations: list[float]) -> None:
    tokens = "|".join(f"t{i}" for i in range(len(activations)))
    assert NONZERO_HEADING not in format_record(rec(tokens, activations), 3.0)


def test_all_zero_neuron_still_gives_a_prompt() -> None:
    backend = FakeBackend(chat=False)
    result = LLMExplainer(backend).explain(ID, [rec("a| b", [0.0, -1.0])])
    assert backend.requests[0].prompt.endswith("<start>\na\t0\n b\t0\n<end>\n"
                                               f"Explanation of neuron 4: {PHRASE}")
    assert result.explanations == ("cats",)


# --- format choice -----------------------------------------------------------------------------

def test_auto_prefers_completion() -> None:
    request = LLMExplainer(FakeBackend(chat=True, completion=True)).build_request(NEURON)
    assert not request.messages and request.prompt.endswith(PHRASE)


def test_auto_uses_chat_on_chat_only_backend() -> None:
    backend = FakeBackend(chat=True, completion=False)
    request = LLMExplainer(backend).build_request(NEURON)
    assert request.prompt is None
    roles = [m.role for m in request.messages]
    assert roles == ["system"] + ["user", "assistant"] * len(FEWSHOT) + ["user"]
    assert request.messages[-1].content.endswith(PHRASE)
    assert " cat\t10" in request.messages[-1].content
    assert request.messages[2].content == FEWSHOT[0][1]


def test_auto_uses_completion_without_chat() -> None:
    request = LLMExplainer(FakeBackend(chat=False)).build_request(NEURON)
    assert not request.messages and request.prompt.endswith(PHRASE)


def test_forced_format() -> None:
    backend = FakeBackend(chat=True, completion=True)
    assert LLMExplainer(backend, prompt_format="completion").build_request(NEURON).prompt
    assert LLMExplainer(backend, prompt_format="chat").build_request(NEURON).messages


@pytest.mark.parametrize("chat, completion, fmt", [(True, False, "completion"),
                                                    (False, True, "chat"),
                                                    (False, False, "auto")])
def test_missing_format_raises(chat: bool, completion: bool, fmt: str) -> None:
    with pytest.raises(ValueError, match="backend"):
        LLMExplainer(FakeBackend(chat=chat, completion=completion), prompt_format=fmt)


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"max_records": 0}, {"max_tokens": 0},
                                    {"temperature": -0.5}, {"prompt_format": "xml"}])
def test_constructor_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LLMExplainer(FakeBackend(), **kwargs)


def test_no_records_raises() -> None:
    with pytest.raises(ValueError, match="at least one"):
        LLMExplainer(FakeBackend()).explain(ID, [])


# --- context fitting ---------------------------------------------------------------------------

def neuron(n_records: int = 3, length: int = 8) -> list[ActivationRecord]:
    """Most active first; record k peaks at the middle with 10 - k."""
    records = []
    for k in range(n_records):
        acts = [0.0] * length
        acts[length // 2] = 10.0 - k
        records.append(rec("|".join(f"w{k}_{i}" for i in range(length)), acts))
    return records


def prompt_tokens(n_fewshot: int, records: list[ActivationRecord]) -> int:
    return len(completion_prompt(FEWSHOT[:n_fewshot], records, 10.0).split())


def fit(context_length: int, records: list[ActivationRecord], max_tokens: int = 20):
    backend = FakeBackend(chat=False, context_length=context_length)
    result = LLMExplainer(backend, max_tokens=max_tokens).explain(ID, records)
    return result, backend.requests[0].prompt


def test_huge_context_drops_nothing() -> None:
    result, _ = fit(1_000_000, neuron())
    assert (result.n_fewshot_used, result.n_records_shown) == (len(FEWSHOT), 3)
    dropped = (result.n_fewshot_dropped, result.n_records_dropped, result.n_lines_truncated)
    assert dropped == (0, 0, 0)


def test_fewshot_dropped_first_last_first() -> None:
    records = neuron()
    result, prompt = fit(prompt_tokens(2, records) + 20, records)
    assert (result.n_fewshot_used, result.n_fewshot_dropped, result.n_records_shown) == (2, 1, 3)
    assert FEWSHOT[1][1] in prompt and FEWSHOT[2][1] not in prompt


def test_then_lowest_excerpts_dropped() -> None:
    records = neuron()
    result, prompt = fit(prompt_tokens(0, records[:2]) + 20, records)
    assert (result.n_fewshot_used, result.n_records_shown, result.n_records_dropped) == (0, 2, 1)
    assert "w2_0" not in prompt and "w0_0" in prompt and "w1_0" in prompt
    assert result.n_lines_truncated == 0


def test_then_the_last_excerpt_is_truncated_around_its_peak() -> None:
    records = neuron(n_records=2, length=40)
    window = rec("|".join(f"w0_{i}" for i in range(18, 23)), [0, 0, 10.0, 0, 0])
    result, prompt = fit(prompt_tokens(0, [window]) + 20, records)
    assert (result.n_fewshot_used, result.n_records_shown) == (0, 1)
    assert result.n_lines_truncated == 35
    assert "w0_20\t10" in prompt and "w0_17" not in prompt and "w1_" not in prompt


def test_tiny_context_never_crashes() -> None:
    result, prompt = fit(5, neuron())
    assert result.explanations == ("cats",)
    assert (result.n_fewshot_used, result.n_records_shown) == (0, 1)
    assert "w0_4\t10" in prompt and result.n_lines_truncated == 7


def test_chat_fitting_counts_messages() -> None:
    records = neuron()
    backend = FakeBackend(chat=True, completion=False, context_length=10_000)
    full = LLMExplainer(backend).explain(ID, records)
    assert full.n_fewshot_used == len(FEWSHOT)
    backend = FakeBackend(chat=True, completion=False, context_length=full.prompt_tokens + 60)
    assert LLMExplainer(backend).explain(ID, records).n_fewshot_used < len(FEWSHOT)


def test_max_records_and_normalisation_over_shown() -> None:
    records = [rec(f"a{k}| b{k}", [0.0, 20.0 - k]) for k in range(15)]
    backend = FakeBackend(chat=False)
    result = LLMExplainer(backend, max_records=10).explain(ID, records)
    assert result.n_records_shown == 10 and result.n_records_dropped == 0
    prompt = backend.requests[0].prompt
    assert " b0\t10" in prompt and " b9\t5" in prompt and " b10\t" not in prompt


# --- parsing and candidates --------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (" months of the year.", "months of the year"),
    ("The main thing this neuron does is find months of the year.", "months of the year"),
    ("the main thing this neuron does is find: closing brackets", "closing brackets"),
    ("  words about\tcooking  and food.\nNeuron 5\nActivations:", "words about cooking and food"),
    ("\n\ncity names\n", "city names"),
    ("findings of fact", "findings of fact"),
])
def test_parse_explanation(text: str, expected: str) -> None:
    assert parse_explanation(text) == expected


@pytest.mark.parametrize("text", ["", "   \n ", ".", "the main thing this neuron does is find",
                                  "The main thing this neuron does is find ."])
def test_parse_empty(text: str) -> None:
    assert parse_explanation(text) == ""


def test_n_candidates_deduplicated_and_failures_counted() -> None:
    backend = FakeBackend(replies=("cats.", " cats", "", "dogs", "\n"))
    result = LLMExplainer(backend, n=5, seed=7).explain(ID, NEURON)
    request = backend.requests[0]
    assert (request.n, request.temperature, request.seed) == (5, 1.0, 7)
    assert result.explanations == ("cats", "dogs")
    assert result.n_failed == 2
    assert result.completion_tokens == 15 and result.prompt_tokens > 0


def test_n3_passes_n_and_dedupes() -> None:
    backend = FakeBackend(replies=("cats",))
    result = LLMExplainer(backend, n=3).explain(ID, NEURON)
    assert len(backend.requests) == 1 and backend.requests[0].n == 3
    assert result.explanations == ("cats",) and result.n_failed == 0


def test_temperature_defaults() -> None:
    assert LLMExplainer(FakeBackend()).build_request(NEURON).temperature == 0.0
    assert LLMExplainer(FakeBackend(), n=2).build_request(NEURON).temperature == 1.0
    assert LLMExplainer(FakeBackend(), n=2, temperature=0.3).build_request(NEURON).temperature == 0.3


def test_an_answer_copying_a_few_shot_answer_is_asked_again_without_that_example() -> None:
    class Copier(FakeBackend):
        """Copies the first example answer it sees in the prompt (as small models do)."""

        def generate(self, request: GenerateRequest) -> Generation:
            self.requests.append(request)
            seen = [answer for _, answer in FEWSHOT if f"{PHRASE} {answer}." in (request.prompt or "")]
            text = f" {seen[0]}" if seen else " words about the weather"
            return Generation((Completion(text),), Usage(10, 2))

    backend = Copier()
    result = LLMExplainer(backend).explain(ID, neuron())
    assert result.explanations == ("words about the weather",)
    assert result.n_copies_replaced == len(FEWSHOT) and len(backend.requests) == len(FEWSHOT) + 1
    assert (result.prompt_tokens, result.completion_tokens) == (10 * (len(FEWSHOT) + 1), 2 * (len(FEWSHOT) + 1))
    assert result.n_fewshot_used == 0


LOGITS = {"promoted": [[" cat", 2.5], ["\n", 1.0]], "suppressed": [[" dog", -2.0], ["\t", -0.5]]}


@pytest.mark.parametrize("chat", [False, True])
def test_show_logits_adds_the_output_line_to_the_target_neuron_only(chat: bool) -> None:
    """explain.show_logits: the tokens the neuron's output promotes and suppresses, one line after
    its excerpts (tabs and newlines escaped); never for the examples, never without the option."""
    other = NeuronId(ID.layer, ID.index + 1)
    for show in (False, True):
        backend = FakeBackend(completion=not chat)
        explainer = LLMExplainer(backend, show_logits=show)
        explainer.outputs = {ID: LOGITS}
        explainer.explain(ID, NEURON)
        explainer.explain(other, NEURON)          # a neuron without logits
        texts = [r.prompt or "\n".join(m.content for m in r.messages) for r in backend.requests]
        line = '"\\n"; it lowers those of " dog", "\\t".'
        assert texts[0].count("Its output raises the next-token logits of") == int(show)
        assert (f'of " cat", {line}' in texts[0]) == show
        assert "Its output raises" not in texts[1]
