"""Simulation strategies for backends without prompt logprobs: one request per token, one
generated sequence per excerpt, logprob-free JSON; the strategy `auto` picks; failures counted."""

from __future__ import annotations

import math
import sys

import pytest

from neuronlens.backends.base import (
    Backend,
    BackendError,
    Capabilities,
    Completion,
    Generation,
    TokenLogprob,
    TransientError,
    Usage,
)
from neuronlens.errors import UserError
from neuronlens.records import ActivationRecord
from neuronlens.scorers.base import SimulationResult
from neuronlens.scorers.simulation import INSTRUCTIONS, Simulator, prompt_prefix
from neuronlens.scorers.strategies import (
    SharedPrompt,
    Unreadable,
    one_at_a_time_request,
    parse_json,
    parse_one,
    parse_sequence,
)

CHAT = Capabilities(chat=True, output_logprobs=True)
COMPLETION = Capabilities(completion=True, output_logprobs=True)


def tl(token: str, *top: tuple[str, float]) -> TokenLogprob:
    """A generated token and its top alternatives, given as probabilities."""
    alts = tuple((t, math.log(p)) for t, p in top)
    own = dict(top).get(token, 1.0)
    return TokenLogprob(token, math.log(own), alts)


def done(*tokens: TokenLogprob, finish: str = "stop") -> Completion:
    return Completion("".join(t.token for t in tokens), tokens, finish)


class FakeBackend(Backend):
    """Answers each generate() with the next canned Completion (or raises the next exception);
    records every request."""

    def __init__(self, capabilities: Capabilities, answers=()):
        self.capabilities, self.answers, self.requests = capabilities, list(answers), []

    def generate(self, request):
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return Generation((answer,), Usage(10, len(answer.logprobs or ()) or 1))


def sim(backend, strategy, **kw) -> Simulator:
    return Simulator(backend, strategy=strategy, fewshot=False, **kw)


# ---- generated_sequence --------------------------------------------------------------------------

TOKENS = ["The", " sea", "\n"]
# The model's copy of the excerpt, as a tokenizer that splits digits would write it: "10" is
# "1" then "0". Written numbers: 0, 10, 3.
ANSWER = (tl("<start>"), tl("\n"),
          tl("The"), tl("\t"), tl("0", ("0", .5), ("1", .25), ("2", .25)), tl("\n"),
          tl(" sea"), tl("\t"), tl("1", ("1", .6), ("9", .2), ("x", .2)),
          tl("0", ("0", .75), ("\n", .25)), tl("\n"),
          tl("\\n"), tl("\t"), tl("3", ("3", .5), (" 4", .3), ("hello", .2)), tl("\n"),
          tl("<end>"))


def test_parse_sequence_by_hand():
    dists = parse_sequence(done(*ANSWER), TOKENS)
    # line 1: 0 .5, 1 .25, 2 .25 -> EV 0.75
    assert dists[0][:3] == pytest.approx((.5, .25, .25)) and sum(dists[0]) == pytest.approx(1)
    # line 2: "1" .6 split by the next token: 10 with P("0")=.75, 1 with the rest; 9 .2; "x"
    # dropped: 1 .15, 9 .2, 10 .45, renormalised over .8
    assert dists[1][1] == pytest.approx(.1875) and dists[1][9] == pytest.approx(.25)
    assert dists[1][10] == pytest.approx(.5625)
    # line 3: "3" .5, " 4" .3 (whitespace ignored), "hello" dropped
    assert dists[2][3] == pytest.approx(.625) and dists[2][4] == pytest.approx(.375)


def test_generated_sequence_expected_values_and_request():
    be = FakeBackend(CHAT, [done(*ANSWER)])
    res = sim(be, "generated_sequence").simulate("words about the sea",
                                                 [ActivationRecord(TOKENS, [0, 1, 0])])
    assert isinstance(res, SimulationResult) and res.n_failed == 0 and res.errors == ()
    assert res.expected[0] == pytest.approx((0.75, 0.1875 + 9 * .25 + 10 * .5625, 3.375))
    assert res.usage == Usage(10, len(ANSWER))
    (request,) = be.requests
    assert request.top_logprobs == 20 and request.temperature == 0
    assert request.max_tokens >= 6 * len(TOKENS)
    system, user = request.messages
    assert system.role == "system" and system.content.startswith(INSTRUCTIONS)
    assert "words about the sea" in user.content
    assert "The\tunknown\n sea\tunknown\n\\n\tunknown\n" in user.content


def test_generated_sequence_completion_prompt():
    be = FakeBackend(COMPLETION, [done(*ANSWER[2:-1])])  # no <start> echo, stopped at <end>
    res = sim(be, "generated_sequence").simulate("sea", [ActivationRecord(TOKENS, [0, 1, 0])])
    assert res.n_failed == 0
    prompt = be.requests[0].prompt
    assert prompt.startswith(prompt_prefix("sea", fewshot=False)) and prompt.endswith("<start>\n")
    assert be.requests[0].stop == ("<end>",)


def _replace(answer, index, token):
    return answer[:index] + (token,) + answer[index + 1:]


@pytest.mark.parametrize("answer, reason", [
    (_replace(ANSWER, 6, tl(" ocean")), "line 2 copies ' ocean' where the token is ' sea'"),
    (ANSWER[:6] + ANSWER[11:], "line 2 copies '\\\\n' where the token is ' sea'"),  # skipped
], ids=["renamed", "skipped"])
def test_misaligned_sequence_is_a_counted_failure(answer, reason):
    records = [ActivationRecord(TOKENS, [0, 1, 0]), ActivationRecord(TOKENS, [0, 1, 0])]
    be = FakeBackend(CHAT, [done(*answer), done(*ANSWER)])
    res = sim(be, "generated_sequence").simulate("sea", records)
    assert res.expected[0] is None and res.distributions[0] is None
    assert res.expected[1] is not None and res.n_failed == 1
    assert res.errors == (f"excerpt 0: misaligned: {reason}",)


def test_sequence_ignores_text_after_end_and_fails_on_an_extra_line():
    after_end = ANSWER + (tl("\n"), tl("x"), tl("\t"), tl("0"))
    assert len(parse_sequence(done(*after_end), TOKENS)) == 3
    extra = ANSWER[:-1] + (tl("x"), tl("\t"), tl("0"), tl("\n"))
    with pytest.raises(Unreadable, match="misaligned: 4 lines for 3 tokens"):
        parse_sequence(done(*extra), TOKENS)


def test_truncated_sequence_is_a_failure():
    cut = done(*ANSWER[:9], finish="length")          # stops at " sea\t1"
    res = sim(FakeBackend(CHAT, [cut]), "generated_sequence").simulate(
        "sea", [ActivationRecord(TOKENS, [0, 1, 0])])
    assert res.expected == (None,) and res.n_failed == 1
    assert "2 lines for 3 tokens" in res.errors[0] and "truncated" in res.errors[0]


def test_sequence_number_not_a_number_or_without_mass():
    bad = _replace(ANSWER, 13, tl("x"))
    with pytest.raises(Unreadable, match="line 3 gives 'x'"):
        parse_sequence(done(*bad), TOKENS)
    no_mass = _replace(ANSWER, 13, tl("3", ("a", .9)))
    with pytest.raises(Unreadable, match="no probability on any of 0-10 at line 3"):
        parse_sequence(done(*no_mass), TOKENS)
    with pytest.raises(Unreadable, match="without logprobs"):
        parse_sequence(Completion("The\t0\n"), ["The"])


def test_sequence_number_merged_with_tab_and_ten_as_one_token():
    # A tokenizer that writes "\t7" as one token and has "10" as a token of its own.
    answer = (tl("a"), tl("\t7", ("\t7", .5), ("\t10", .5)), tl("\n"),
              tl("b"), tl("\t"), tl("10", ("10", .8), ("1", .2)), tl("\n"))
    dists = parse_sequence(done(*answer), ["a", "b"])
    assert dists[0][7] == pytest.approx(.5) and dists[0][10] == pytest.approx(.5)
    assert dists[1][10] == pytest.approx(.8) and dists[1][1] == pytest.approx(.2)


# ---- one_at_a_time -------------------------------------------------------------------------------

def test_one_at_a_time_by_hand():
    answers = [done(tl("0", ("0", .5), (" 2", .25), ("x", .25))),   # 0: 2/3, 2: 1/3
               done(tl("10", ("10", .5), ("1", .5))),               # "10" is one token
               done(tl("1", ("1", .4), ("0", .4), ("A", .2)))]      # digits split: "1" is 1
    be = FakeBackend(COMPLETION, answers)
    res = sim(be, "one_at_a_time").simulate("x", [ActivationRecord(["a", " b", "\n"], [0, 0, 0])])
    assert res.n_failed == 0
    assert res.expected[0] == pytest.approx((2 / 3, 5.5, 0.5))
    assert res.distributions[0][1][10] == pytest.approx(.5)
    assert len(be.requests) == 3
    prefix = prompt_prefix("x", fewshot=False)
    assert [r.prompt for r in be.requests] == [
        prefix + "a\t", prefix + "a\tunknown\n b\t", prefix + "a\tunknown\n b\tunknown\n\\n\t"]
    assert all(r.max_tokens == 2 and r.top_logprobs == 20 and r.temperature == 0
               for r in be.requests)
    assert res.usage == Usage(30, 3)


def test_one_at_a_time_chat_and_zero_mass():
    answers = [done(tl("5", ("5", 1.0))), done(tl("The", ("The", .9), ("A", .1))),
               done(tl("3", ("3", 1.0)))]
    be = FakeBackend(CHAT, answers)
    records = [ActivationRecord(["a", "b", "c"], [0, 0, 0]), ActivationRecord(["d"], [0])]
    res = sim(be, "one_at_a_time").simulate("x", records)
    assert res.expected == (None, pytest.approx((3.0,)))
    assert res.errors == ("excerpt 0: no probability on any of 0-10 in the answer",)
    assert len(be.requests) == 3          # excerpt 0 stopped at its failed token
    system, user = be.requests[0].messages
    assert system.content.startswith(INSTRUCTIONS) and "only the activation" in user.content
    assert "a\t\n" in user.content and "'a'" in user.content


def test_one_at_a_time_reads_10_by_the_rule_of_generated_sequence():
    """A "1" then a "0" is 10: the mass on 1 is split by the probability of a following "0",
    exactly as parse_sequence splits it (one rule for "10" in every strategy)."""
    answer = done(tl("1", ("1", .8), ("3", .2)), tl("0", ("0", .75), ("\n", .25)))
    probs = parse_one(answer)
    assert probs[10] == pytest.approx(.8 * .75) and probs[1] == pytest.approx(.8 * .25)
    assert probs[3] == pytest.approx(.2)
    listing = done(tl("The", ("The", 1.0)), tl("\t", ("\t", 1.0)), tl("1", ("1", .8), ("3", .2)),
                   tl("0", ("0", .75), ("\n", .25)), tl("\n", ("\n", 1.0)))
    assert parse_sequence(listing, ["The"])[0] == pytest.approx(probs)
    assert parse_one(done(tl("1", ("1", 1.0)), tl("\n", ("\n", 1.0))))[1] == pytest.approx(1.0)
    assert one_at_a_time_request(SharedPrompt("p", "s", "b", False), ["a"], 0).max_tokens == 2


def test_parse_one_sums_alternatives_of_the_same_number():
    probs = parse_one(done(tl("4", ("4", .3), (" 4", .3), ("4\n", .2), ("six", .2))))
    assert probs[4] == pytest.approx(1.0)


# ---- json ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, prefilled, values", [
    ("0, 3, 10", True, (0, 3, 10)),                       # completion: prompt ends with "["
    ("Sure:\n```json\n[0, 3, 10]\n```", False, (0, 3, 10)),
    ("[0, 3.0, 10] and later [1]", False, (0, 3, 10)),
])
def test_parse_json(text, prefilled, values):
    assert parse_json(Completion(text), 3, prefilled) == values


@pytest.mark.parametrize("text, reason", [
    ("[0, 3]", "2 numbers for 3 tokens"),
    ("I cannot tell.", "no JSON list"),
    ("[0, 11, 2]", "whole numbers from 0 to 10"),
    ("[0, 'a', 2]", "not valid JSON"),
    ("[0, 2.5, 2]", "whole numbers"),
])
def test_parse_json_failures(text, reason):
    with pytest.raises(Unreadable, match=reason):
        parse_json(Completion(text), 3, prefilled=False)


def test_json_strategy_one_hot_and_failures():
    be = FakeBackend(Capabilities(chat=True), [Completion("[0, 7]"), Completion("no idea")])
    records = [ActivationRecord(["a", "b"], [0, 1]), ActivationRecord(["c"], [0])]
    res = sim(be, "auto").simulate("x", records)
    assert res.expected == ((0.0, 7.0), None) and res.n_failed == 1
    assert res.distributions[0][1] == tuple(1.0 if i == 7 else 0.0 for i in range(11))
    assert "excerpt 1: no JSON list" in res.errors[0]
    assert be.requests[0].top_logprobs == 0 and be.requests[0].temperature == 0


def test_json_completion_prompt_ends_with_bracket():
    be = FakeBackend(Capabilities(completion=True), [Completion("4, 0")])
    res = sim(be, "json").simulate("x", [ActivationRecord(["a", "b"], [0, 1])])
    assert res.expected == ((4.0, 0.0),)
    assert be.requests[0].prompt.endswith("[") and be.requests[0].stop == ("]",)


# ---- choosing a strategy, and failures -----------------------------------------------------------

@pytest.mark.parametrize("caps, strategy", [
    (Capabilities(completion=True, output_logprobs=True, prompt_logprobs=True), "all_at_once"),
    (Capabilities(chat=True, output_logprobs=True), "generated_sequence"),
    (Capabilities(completion=True, output_logprobs=True), "generated_sequence"),
    (Capabilities(chat=True), "json"),
    (Capabilities(completion=True), "json"),
])
def test_auto_picks_from_capabilities(caps, strategy):
    assert Simulator(FakeBackend(caps)).strategy == strategy


@pytest.mark.parametrize("caps, strategy, words", [
    (CHAT, "all_at_once", "cannot score prompts"),
    (Capabilities(chat=True), "one_at_a_time", "no output logprobs"),
    (Capabilities(completion=True), "generated_sequence", "no output logprobs"),
    (Capabilities(output_logprobs=True), "json", "neither chat nor completion"),
    (Capabilities(), "auto", "cannot simulate"),
])
def test_forced_strategy_without_capability_fails_at_check(caps, strategy, words):
    simulator = Simulator(FakeBackend(caps), strategy=strategy)   # constructing is fine
    with pytest.raises(BackendError, match=words) as info:
        simulator.check()
    msg = str(info.value)
    assert "FakeBackend" in msg and "\n" not in msg and msg.endswith(".")


def test_the_reference_prompt_needs_prompt_logprobs_and_its_package(monkeypatch):
    pytest.importorskip("neuron_explainer.explanations.simulator")
    simulator = Simulator(FakeBackend(CHAT), prompt="openai")
    with pytest.raises(UserError, match="simulation.prompt=openai is the reference's all-at-once") as info:
        simulator.check()
    assert "generated_sequence" in str(info.value) and "\n" not in str(info.value)
    Simulator(FakeBackend(Capabilities(completion=True, prompt_logprobs=True)), prompt="openai").check()

    from neuronlens.scorers import reference_prompt

    reference_prompt._builder.cache_clear()
    monkeypatch.setitem(sys.modules, "neuron_explainer.explanations.simulator", None)
    try:   # found when the simulator is built, before any model loads
        with pytest.raises(UserError, match="install it with `pip install --no-deps automated-interp"):
            Simulator(FakeBackend(COMPLETION), prompt="openai")
    finally:
        reference_prompt._builder.cache_clear()
    with pytest.raises(UserError, match="Unknown simulation prompt 'gpt'; choose one of neuronlens, openai"):
        Simulator(FakeBackend(COMPLETION), prompt="gpt")


def test_unknown_strategy():
    with pytest.raises(ValueError, match="generated_sequence"):
        Simulator(FakeBackend(CHAT), strategy="sequence")


def test_transient_error_after_the_policy_retries_fails_one_excerpt():
    be = FakeBackend(COMPLETION, [done(tl("2", ("2", 1.0))), TransientError("503 unavailable")])
    records = [ActivationRecord(["a"], [0]), ActivationRecord(["b"], [0])]
    res = sim(be, "one_at_a_time").simulate("x", records)
    assert res.expected == (pytest.approx((2.0,)), None)
    assert res.errors == ("excerpt 1: 503 unavailable",)
    assert len(be.requests) == 2            # the engine itself never retries


def test_backend_error_stops_the_run():
    be = FakeBackend(CHAT, [BackendError("The server does not know model 'x' (404)."), done(*ANSWER)])
    records = [ActivationRecord(TOKENS, [0, 0, 0])] * 2
    with pytest.raises(BackendError, match="404"):  # every excerpt would fail the same way
        sim(be, "generated_sequence").simulate("x", records)


def test_no_records():
    res = sim(FakeBackend(CHAT), "generated_sequence").simulate("x", [])
    assert res.expected == () and res.n_failed == 0


# ---- end to end on a real (tiny, random) local model ---------------------------------------------

@pytest.mark.parametrize("strategy", ["one_at_a_time", "generated_sequence", "json"])
def test_strategies_on_local_backend(strategy, tiny_llama, tiny_tokenizer):
    from neuronlens.backends.local import LocalBackend

    be = LocalBackend()
    be.model, be.tokenizer = tiny_llama, tiny_tokenizer
    records = [ActivationRecord(["The", " sea", "\n", "7"], [0.0, 3.0, 0.0, 1.0]),
               ActivationRecord(["x"], [0.0])]
    res = Simulator(be, strategy=strategy).simulate("words about the sea", records)
    assert len(res.expected) == len(res.distributions) == 2
    assert len(res.errors) == res.n_failed        # every failure has its reason
    for exp, dist, record in zip(res.expected, res.distributions, records):
        assert (exp is None) == (dist is None)
        if exp is not None:
            assert len(exp) == len(dist) == len(record.tokens)
            assert all(0.0 <= e <= 10.0 for e in exp)
            assert all(sum(row) == pytest.approx(1.0) for row in dist)
    assert res.usage.prompt_tokens > 0 and res.usage.completion_tokens > 0


def test_one_at_a_time_reads_a_real_backends_top_logprobs(tiny_llama, tiny_tokenizer):
    """A tiny model rigged to answer "3" whatever it reads (logit 10 against 0 for every other
    token): one token at a time reads about 3 everywhere, like the exact all-at-once scoring."""
    import copy

    import torch

    from neuronlens.backends.local import LocalBackend

    model = copy.deepcopy(tiny_llama)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    (three,) = tiny_tokenizer("3", add_special_tokens=False)["input_ids"]
    head.bias.data[three] = 10.0
    model.lm_head = head
    be = LocalBackend()
    be.model, be.tokenizer = model, tiny_tokenizer
    records = [ActivationRecord(["The", " sea", "\n"], [0.0, 3.0, 0.0])]
    res = Simulator(be, strategy="one_at_a_time", fewshot=False).simulate("the sea", records)
    assert res.n_failed == 0 and res.usage.completion_tokens == 3 * 2   # two tokens per answer
    assert res.expected[0] == pytest.approx((3.0,) * 3, abs=0.01)
    exact = Simulator(be, strategy="all_at_once", fewshot=False).simulate("the sea", records)
    assert exact.expected[0] == pytest.approx(res.expected[0], abs=0.01)
