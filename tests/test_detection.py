"""Detection and fuzzing: the items each builds from a neuron's excerpts, the prompts and answers
on completion and chat backends, the binary scores, failures counted and never read as labels,
and both as judges of a whole run (scores, judge power, summary, report, viewer)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from neuronlens.backends.base import Backend, Capabilities, Completion, Generation, TokenLogprob, Usage
from neuronlens.errors import UserError
from neuronlens.records import ActivationRecord
from neuronlens.scorers.classification import answer_probabilities, binary_scores, shown
from neuronlens.scorers.detection import Detection
from neuronlens.scorers.fuzzing import Fuzzing
from test_pipeline import corpus  # noqa: F401 - the fixture

COMPLETION = Capabilities(completion=True, output_logprobs=True)
CHAT = Capabilities(chat=True)


def rec(words: list[str], acts: list[float]) -> ActivationRecord:
    return ActivationRecord(words, acts)


# the unit fires on " cat"; top excerpts hold it, random ones mostly do not
TOP = [rec(["The", " cat", " sat", f" {i}"], [0.0, 4.0 + i, 0.5, 0.0]) for i in range(6)]
RANDOM = ([rec(["A", " dog", " ran", f" {i}"], [0.1, 0.2, 0.0, 0.3]) for i in range(5)]
          + [rec(["The", " sat", " mat", " cat"], [0.0, 0.0, 0.1, 0.2]),    # shares tokens with the tops
             rec(["A", " bird", " sang", " loud"], [3.0, 0.0, 0.0, 0.0])])   # fires: not a negative


class Oracle(Backend):
    """Answers each question by a rule on the excerpt as shown (``says``), with P("1") 0.8 or
    0.2 in its logprobs; records every request."""

    def __init__(self, says, capabilities=COMPLETION, broken: int = -1):
        self.says, self.capabilities, self.requests, self.broken = says, capabilities, [], broken
        self.answers: list[Generation] = []

    def generate(self, request):
        self.requests.append(request)
        text = request.prompt if request.prompt is not None else request.messages[-1].content
        target = text[text.rindex("Description:"):]
        answers = [int(self.says(line)) for line in re.findall(r"^Excerpt \d+: (.*)$", target, re.M)]
        if len(self.requests) - 1 == self.broken:
            answers = answers[:-1]   # one number short: unreadable
        tokens = []
        for i, (a, line) in enumerate(zip(answers, re.findall(r"^Excerpt \d+: (.*)$", target, re.M))):
            p = (0.6 + len(line) % 4 / 10) if a else (0.4 - len(line) % 4 / 10)   # varied, on the answer's side
            tokens.append(TokenLogprob(str(a), math.log(p if a else 1 - p),
                                       (("1", math.log(p)), ("0", math.log(1 - p)))))
            if i < len(answers) - 1:
                tokens.append(TokenLogprob(", ", 0.0))
        body = "".join(t.token for t in tokens)
        prefilled = request.prompt is not None
        logprobs = tuple(tokens) if request.top_logprobs else None
        self.answers.append(Generation((Completion(body if prefilled else f"[{body}]", logprobs),), Usage(100, 10)))
        return self.answers[-1]


def test_detection_asks_about_top_excerpts_and_random_ones_below_the_threshold():
    judge = Detection(Oracle(lambda line: " cat" in line), examples_per_prompt=4)
    scored = judge.score("the word cat", TOP, RANDOM)
    cut = 0.25 * 9.0   # threshold x the largest top activation
    below = [i for i, r in enumerate(RANDOM) if max(r.activations) < cut]
    assert len(below) == 6   # the bird excerpt fires
    asked = [i for i, p in enumerate(scored.predictions) if p]
    assert len(asked) == 12 and sum(i < len(TOP) for i in asked) == 6   # balanced: 6 and 6
    assert len(TOP) + 6 not in asked   # the excerpt above the threshold is never a negative
    labels = {i: p[0]["label"] for i, p in enumerate(scored.predictions) if p}
    assert all(labels[i] == (i < len(TOP)) for i in asked)
    # the oracle calls "the sat mat cat" activating: one false positive of 6 negatives
    s = scored.scores["all"]
    assert s["balanced_accuracy"] == pytest.approx((1 + 5 / 6) / 2)
    assert s["precision"] == pytest.approx(6 / 7) and s["recall"] == 1.0
    pos = [i["p"] for p in scored.predictions if p for i in p if i["label"]]
    neg = [i["p"] for p in scored.predictions if p for i in p if not i["label"]]
    assert all(p > 0.5 for p in pos) and len(pos) == len(neg) == 6   # P("1") as the oracle answered
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    assert s["auc"] == pytest.approx(wins / 36)   # the Mann-Whitney AUC of P("1")
    assert scored.scores["top"]["flag"] == "one class" and scored.scores["top"]["accuracy"] == 1.0
    assert scored.value() == s["balanced_accuracy"] and scored.metric.name == "balanced_accuracy"
    assert len(judge.backend.requests) == 3   # 12 items, 4 to a prompt
    prompt = judge.backend.requests[0].prompt
    assert prompt.endswith("Answer (4 numbers): [") and "Description: the word cat" in prompt
    assert prompt.count("Excerpt 1:") == 2   # the example has as many excerpts as asked
    assert scored.result.n_failed == 0 and scored.result.usage == Usage(300, 30)


def test_hard_negatives_are_those_sharing_the_most_tokens_with_what_fires():
    top = TOP[:2]
    judge = Detection(Oracle(lambda line: False), negatives="hard")
    scored = judge.score("cats", top, RANDOM)
    negatives = [i - len(top) for i, p in enumerate(scored.predictions) if p and i >= len(top)]
    assert negatives == [0, 5]   # "The sat mat cat" shares " cat"; the rest share nothing (ties: in order)
    random_pick = Detection(Oracle(lambda line: False)).score("cats", top, RANDOM)
    assert sum(1 for p in random_pick.predictions if p) == 4


def test_fuzzing_marks_each_top_excerpt_rightly_once_and_at_random_once():
    judge = Fuzzing(Oracle(lambda line: "<< cat>>" in line), examples_per_prompt=5)
    scored = judge.score("the word cat", TOP, RANDOM)
    shown_texts = [l for r in judge.backend.requests
                   for l in re.findall(r"^Excerpt \d+: (.*)$", r.prompt[r.prompt.rindex("Description:"):], re.M)]
    assert len(shown_texts) == 12 and sum("<< cat>>" in t for t in shown_texts) == 6
    assert all(t.count("<<") == 1 for t in shown_texts)   # one token marked, right or misplaced
    assert all(len(p) == 2 and {i["label"] for i in p} == {0, 1} for p in scored.predictions[:len(TOP)])
    assert all(p == () for p in scored.predictions[len(TOP):])   # random excerpts are never asked
    assert scored.scores["all"]["balanced_accuracy"] == 1.0 and scored.scores["all"]["auc"] == 1.0
    inverted = Fuzzing(Oracle(lambda line: "<< cat>>" not in line)).score("the word cat", TOP, RANDOM)
    assert inverted.value() == 0.0


# quantile samples: one fires weaker than every top excerpt yet above the cut, one below it
QUANTILE = [rec(["My", " cat", " slept", "."], [0.0, 3.0, 0.1, 0.0]),
            rec(["Go", " home", " now", "."], [0.2, 0.1, 0.0, 0.1])]


def test_quantile_samples_join_the_side_of_the_cut_their_max_falls_on():
    judge = Detection(Oracle(lambda line: " cat" in line), examples_per_prompt=4)
    scored = judge.score("the word cat", TOP, RANDOM, QUANTILE)
    offset = len(TOP) + len(RANDOM)
    assert len(scored.predictions) == offset + 2
    labels = {i: p[0]["label"] for i, p in enumerate(scored.predictions) if p}
    assert sum(labels.values()) == len(labels) - sum(1 - v for v in labels.values()) == 7   # 7 and 7
    assert labels[offset] == 1 and labels[offset + 1] == 0   # 3.0 >= 0.25 x 9.0 > 0.2
    assert scored.scores["quantile"]["n"] == 2 and scored.scores["all"]["n"] == 14
    assert scored.scores["all"]["balanced_accuracy"] == pytest.approx((1 + 6 / 7) / 2)
    assert "quantile" not in judge.score("the word cat", TOP, RANDOM).scores   # none given, none scored
    fuzzed = Fuzzing(Oracle(lambda line: "<< cat>>" in line)).score("the word cat", TOP, RANDOM, QUANTILE)
    assert len(fuzzed.predictions[offset]) == 2 and fuzzed.predictions[offset + 1] == ()   # nothing to mark


def test_a_split_holds_its_own_quantile_samples_each_once_and_none_already_top_or_random():
    from neuronlens.records import NeuronId, NeuronRecord, split_of

    extra = [rec(["Quantile", f" {i}", " text"], [0.0, i / 10, 0.0]) for i in range(40)]
    neuron = NeuronRecord(NeuronId(0, 0), TOP, RANDOM,
                          random_sample_by_quantile=[extra[:20] + [TOP[0]], extra[20:] + extra[:3] + [RANDOM[0]]])
    by_split = {name: neuron.split(name).quantile for name in ("train", "valid", "test", "calibration")}
    got = [r.key() for q in by_split.values() for r in q]
    assert sorted(got) == sorted(r.key() for r in extra)   # each once; no top or random excerpt
    assert all(split_of(r) == name for name, q in by_split.items() for r in q)
    assert by_split["test"] and by_split["train"]


def test_an_unreadable_answer_fails_its_prompts_excerpts_and_is_never_a_label():
    judge = Detection(Oracle(lambda line: " cat" in line, broken=1), examples_per_prompt=4)
    scored = judge.score("the word cat", TOP, RANDOM)
    assert len(scored.result.failures) == 4 and scored.result.n_failed == 4
    assert {f.kind for f in scored.result.failures} == {"unreadable"}
    assert "3 numbers for 4 tokens" in scored.result.failures[0].message
    failed = {f.excerpt for f in scored.result.failures}
    assert all(scored.predictions[i] is None for i in failed)
    assert scored.scores["all"]["n"] == 8   # the other two prompts' answers alone
    assert scored.result.usage == Usage(300, 30)   # the unreadable answer's tokens count too


def test_chat_backends_get_messages_and_no_logprobs_means_no_auc():
    backend = Oracle(lambda line: " cat" in line, capabilities=CHAT)
    scored = Detection(backend, examples_per_prompt=6).score("the word cat", TOP, RANDOM)
    request = backend.requests[0]
    assert request.prompt is None and request.top_logprobs == 0
    assert "Excerpt 6:" in request.messages[1].content and "JSON list" in request.messages[0].content
    assert scored.scores["all"]["balanced_accuracy"] == pytest.approx((1 + 5 / 6) / 2)
    assert scored.scores["all"]["auc"] is None   # answers without logprobs: no AUC
    assert {i["p"] for p in scored.predictions if p for i in p} == {None}


def test_answer_probabilities_line_up_with_the_numbers_or_are_left_out():
    two = Completion("1, 0]", (TokenLogprob("1", -0.1, (("1", math.log(.6)), ("0", math.log(.2)),
                                                         ("x", math.log(.2)))),
                                TokenLogprob(",", 0.0), TokenLogprob(" 0", -0.1, ((" 0", math.log(.5)),))))
    assert answer_probabilities(two, 2) == [pytest.approx(0.75), 0.0]
    assert answer_probabilities(two, 3) == [None] * 3
    assert answer_probabilities(Completion("1, 0]"), 2) == [None, None]
    assert binary_scores([1, 0], [1, 1], [None, 0.4])["auc"] is None
    assert binary_scores([], [], [])["flag"] == "no examples"


def test_marks_join_runs_of_tokens_and_excerpts_stay_on_one_line():
    assert shown(["a", " b", " c", "\n", "d"], [1, 2, 4]) == "a<< b c>>\\n<<d>>"


def test_settings_are_checked():
    with pytest.raises(UserError, match="threshold"):
        Detection(Oracle(bool), threshold=1.5)
    with pytest.raises(UserError, match="negatives"):
        Detection(Oracle(bool), negatives="easy")
    with pytest.raises(UserError, match="as a judge"):
        Fuzzing(Oracle(bool)).simulate("x", TOP)
    with pytest.raises(UserError, match="generates no text"):
        Detection(Oracle(bool, capabilities=Capabilities())).check()


def test_detection_and_fuzzing_judge_a_whole_run(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """Both as judges on the local backend: each row holds both scores and per-excerpt answers
    aligned with its test excerpts; summary.json has their metric and judge power; only test
    excerpts reach them; the report's agreement section and the viewer show them."""
    import neuronlens.pipeline as pipeline
    from neuronlens.report.cli import main as report_main
    from neuronlens.report.site import neuron_view
    from neuronlens.scorers import classification
    from neuronlens.scorers.classification import ListClassifier
    from test_pipeline import rows, tiny_run_config

    given: list[tuple[list, list]] = []
    real_score, records = ListClassifier.score, {}

    def spy(self, explanation, top, random_, quantile=()):
        given.append((list(top), list(random_), list(quantile)))
        return real_score(self, explanation, top, random_, quantile)

    real_process = pipeline.process

    def process(neuron, *args, **kwargs):
        records[neuron.neuron_id] = neuron
        return real_process(neuron, *args, **kwargs)

    # the tiny random model never writes a list (every excerpt would fail, counted): answer for it
    oracle = Oracle(lambda line: len(line) % 3 == 0)
    monkeypatch.setattr(classification, "generate_checked", lambda backend, request, parse: oracle.generate(request))
    monkeypatch.setattr(ListClassifier, "score", spy)
    monkeypatch.setattr(pipeline, "process", process)
    extra = ["+simulator@judges.detection=detection", "+simulator@judges.fuzzing=fuzzing",
             f"judges.detection.backend.model={tiny_llama_dir}", f"judges.fuzzing.backend.model={tiny_llama_dir}",
             "judges.detection.examples_per_prompt=3", "recording.quantiles=4", "recording.per_quantile=4"]
    summary = pipeline.run(tiny_run_config(tiny_llama_dir, corpus, extra=extra), tmp_path / "run")
    out = rows(tmp_path / "run")
    scored = [r for r in out if r.get("judges")]
    assert scored, "no neuron was judged: the test would check nothing"
    for row in scored:
        for name in ("detection", "fuzzing"):
            entry = row["judges"][name]
            assert entry["metric"] == "balanced_accuracy" and "test_simulated" not in entry
            assert len(entry["test_predictions"]) == len(row["test_excerpts"])
            assert {"accuracy", "precision", "recall", "f1", "auc", "balanced_accuracy"} <= set(
                entry["scores"]["test"]["all"]) or entry["scores"]["test"]["all"]["flag"]
            assert entry["failed_excerpts"] == sum(p is None for p in entry["test_predictions"])
    held_in = {r.key() for n in records.values() for name in ("train", "valid", "calibration")
               for r in n.split(name).all}
    test = {r.key() for n in records.values() for r in n.split("test").all}
    run_given = [r.key() for top, rnd, _ in given for r in [*top, *rnd]]
    assert run_given and not set(run_given) & held_in
    assert len(set(run_given) & test) > 0
    quantile_given = {r.key() for _, _, q in given for r in q}   # the test split's quantile samples
    quantile_test = {r.key() for n in records.values() for r in n.split("test").quantile}
    assert quantile_given and quantile_given <= quantile_test and not quantile_given & held_in
    assert all(not {r.key() for r in t.quantile} & {r.key() for r in t.all}
               for t in (n.split("test") for n in records.values()))
    assert any("quantile" in r["judges"]["detection"]["scores"]["test"] for r in scored)
    for name in ("detection", "fuzzing"):
        assert summary["judges"][name]["metric"] == "balanced_accuracy"
        power = summary["judge_power"][name]
        assert power["metric"] == "balanced_accuracy" and power["n"] > 0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(saved["judge_power"]) >= {"simulator", "similarity", "detection", "fuzzing"}
    view = neuron_view(scored[0])
    assert any(a.startswith(("detection: ", "fuzzing: ")) for ex in view["excerpts"] for a in ex["answers"])
    assert all(j["name"] not in ("detection", "fuzzing") for j in view["judges"])   # no per-token strip
    report_main([str(tmp_path / "run"), "--no-sites"])
    report = (tmp_path / "run" / "report.md").read_text()
    agreement = report[report.index("## Simulator agreement"):]
    assert "detection" in agreement and "fuzzing" in agreement


@pytest.mark.parametrize("kind", ["openai", "litellm"])
def test_chat_only_backends_over_http_ask_and_count_what_fails(kind, chat_model_dir, monkeypatch):
    """Through neuronlens-serve's chat endpoint, as the OpenAI and LiteLLM backends talk to a real
    server: every question is asked as messages, and every excerpt is answered or failed with its
    kind (a tiny random model rarely writes the list), never given a default label."""
    from neuronlens.backends.litellm import LiteLLMBackend
    from neuronlens.backends.openai import OpenAIBackend
    from neuronlens.serve import start_server

    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    with start_server(str(chat_model_dir), device="cpu") as server:
        backend = (OpenAIBackend(server.model, server.base_url, top_logprobs=5) if kind == "openai" else
                   LiteLLMBackend(f"openai/{server.model}", server.base_url, top_logprobs=5, logprobs=True))
        backend.load()
        judge = Fuzzing(backend, examples_per_prompt=4)
        judge.check()
        scored = judge.score("the word cat", TOP, RANDOM)
    assert scored.result.usage.prompt_tokens > 0
    asked = [p for p in scored.predictions[:len(TOP)]]
    failed = {f.excerpt for f in scored.result.failures}
    assert all((p is None) == (i in failed) for i, p in enumerate(asked))
    assert all(f.kind for f in scored.result.failures)
    answered = sum(len(p) for p in asked if p)
    assert scored.scores["all"]["n"] == answered and answered + 2 * len(failed) == 12


@pytest.mark.peers
def test_delphi_reads_the_same_answers_as_neuronlens(tmp_path):
    """Cross-check against EleutherAI's delphi 0.1.3 (a venv of its own: tests/delphi_peer.py). The
    prompts differ by design, so the same excerpts, labels and answers (text and logprobs) go through
    delphi's own parsing, P("1") and metrics: every prediction, probability and the balanced
    accuracy (delphi's "accuracy"), precision, recall, F1 and AUC must match neuronlens's."""
    import os
    import subprocess

    import delphi_peer

    if not delphi_peer.python().exists():
        if os.environ.get("NEURONLENS_REQUIRE_PEERS"):
            pytest.fail("the delphi venv is missing: python tests/delphi_peer.py install")
        pytest.skip("no delphi venv (python tests/delphi_peer.py install)")
    caps = Capabilities(chat=True, output_logprobs=True)   # whole "[...]" answers, as delphi reads them
    varied = lambda says: lambda line: says(line)   # noqa: E731
    cases, ours = [], []
    sets = [(TOP, RANDOM), (TOP[:4], RANDOM[2:])]
    for kind, says in ((Detection, lambda line: " cat" in line or len(line) % 5 == 0),
                       (Fuzzing, lambda line: "<< cat>>" in line or len(line) % 4 == 0)):
        for top, rnd in sets:
            backend = Oracle(varied(says), capabilities=caps)
            judge = kind(backend, examples_per_prompt=3)
            scored = judge.score("the word cat", top, rnd)
            answered, seen = {}, {}
            for item in judge.items(top, rnd):   # each excerpt's answers in the order of its items
                k = seen[item.excerpt] = seen.get(item.excerpt, -1) + 1
                answered[item.shown] = (item.label, scored.predictions[item.excerpt][k])
            prompts = []
            for request, generation in zip(backend.requests, backend.answers):
                shown = re.findall(r"^Excerpt \d+: (.*)$", request.messages[-1].content, re.M)
                c = generation.completions[0]
                prompts.append({"items": [{"shown": s, "label": answered[s][0], "tokens": [], "activations": []}
                                          for s in shown],
                                "completion": {"text": c.text, "logprobs": [
                                    {"token": t.token, "logprob": t.logprob, "top": list(t.top)} for t in c.logprobs]}})
                ours.append([answered[s][1] for s in shown])
            cases.append({"scorer": kind.__name__.lower(), "explanation": "the word cat", "prompts": prompts,
                          "scores": scored.scores["all"]})
    (tmp_path / "in.json").write_text(json.dumps(cases))
    subprocess.run([str(delphi_peer.python()), str(Path(delphi_peer.__file__)), "score", str(tmp_path / "in.json"),
                    str(tmp_path / "out.json")], check=True, cwd=tmp_path)
    theirs = json.loads((tmp_path / "out.json").read_text())
    flat = iter([a for prompt in ours for a in prompt])
    for case, got in zip(cases, theirs):
        for prediction, probability in zip(got["predictions"], got["probabilities"]):
            mine = next(flat)
            assert prediction == bool(mine["answer"]) and probability == pytest.approx(mine["p"], abs=1e-4)
        s = case["scores"]
        assert got["accuracy"] == pytest.approx(s["balanced_accuracy"])
        assert (got["precision"], got["recall"], got["f1_score"]) == pytest.approx((s["precision"], s["recall"], s["f1"]))
        assert got["auc"] == pytest.approx(s["auc"])
    assert len(theirs) == 4


def test_the_order_of_labels_differs_between_neurons_and_stays_for_one():
    """A model that copies the example's answers must not score by the order alone: the items'
    order is drawn from the seed and the excerpts, so it is the same for every call on one
    neuron (true and shuffled explanations see one order) and differs between neurons."""
    def order(top, rnd, explanation="cats"):
        backend = Oracle(lambda line: False)
        judge = Detection(backend, examples_per_prompt=12)
        labels = {item.shown: item.label for item in judge.items(top, rnd)}
        judge.score(explanation, top, rnd)
        target = backend.requests[0].prompt[backend.requests[0].prompt.rindex("Description:"):]
        return [labels[s] for s in re.findall(r"^Excerpt \d+: (.*)$", target, re.M)]

    other = [rec([w.replace("The", "A") for w in r.tokens], r.activations) for r in TOP]
    assert order(TOP, RANDOM) == order(TOP, RANDOM, "dogs")
    assert order(TOP, RANDOM) != order(other, RANDOM)
