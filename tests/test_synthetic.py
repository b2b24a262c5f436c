"""Synthetic rule neurons: exactly their rule's activations, and the truth/shuffled/top-token
explainers that the benchmark report measures LLM explainers against."""

from __future__ import annotations

import json
import re

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import neuronlens.pipeline as pipeline
from neuronlens.explainers.baselines import Shuffled, TopTokens, Truth
from neuronlens.conf import CONF_DIR
from neuronlens.errors import UserError
from neuronlens.records import ActivationRecord, NeuronId, NeuronRecord
from neuronlens.subject.synthetic import SyntheticSubject, make_rule
from test_pipeline import config, corpus, rows  # noqa: F401 (fixture)

RULES = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "subject" / "synthetic.yaml").neurons)


def by_hand(spec: dict, tokens: list[str]) -> list[float]:
    """Each rule written again, independently of neuronlens.subject.synthetic."""
    words = {w.lower() for w in spec.get("words", [])}
    out = []
    for i, t in enumerate(tokens):
        s = t.strip()
        fire = {"digits": lambda: bool(re.search(r"\d", t)),
                "words": lambda: s.lower() in words,
                "capitalised": lambda: s[:1].isupper() and (i == 0 or t[:1] in " \n\t"),
                "position": lambda: i < spec.get("first", 0),
                "after": lambda: i > 0 and tokens[i - 1].strip().lower() in words,
                "regex": lambda: re.fullmatch(spec.get("pattern", ""), s) is not None}[spec["kind"]]()
        out.append(float(fire))
    return out


@pytest.mark.parametrize("tokens", [
    [" The", " dog", " ate", " 42", " cats", " on", " Monday", " not", "'t"],
    ["Rain", " fell", " in", " May", ";", " the", " weather", " was", " not", " sunny", "."],
])
def test_each_rule_fires_on_exactly_its_tokens(tokens):
    for spec in RULES + [{"kind": "regex", "pattern": r"[A-Z]\w+", "explanation": "x"}]:
        assert make_rule(spec)(tokens) == by_hand(spec, tokens), spec["explanation"]


def test_recorded_synthetic_neurons_are_their_rules(tiny_llama_dir, corpus, tmp_path):  # noqa: F811
    cfg = config(["subject=synthetic", f"subject.tokenizer={tiny_llama_dir}", "corpus=files",
                  f"corpus.paths=[{corpus}]", "recording.window=16", "recording.top_k=6",
                  "recording.n_random=6"])
    subject = SyntheticSubject(cfg.subject.neurons, str(tiny_llama_dir))
    neurons = subject.select(cfg.neurons, 0)
    assert neurons == [NeuronId(0, i) for i in range(len(RULES))]
    records = subject.records(neurons, instantiate(cfg.corpus), cfg.recording, cfg.seed, tmp_path)
    for record in records:
        spec = RULES[record.neuron_id.index]
        excerpts = record.most_positive_activation_records + record.random_sample
        assert len(record.most_positive_activation_records) == 6
        assert len(record.random_sample) == 6
        for r in excerpts:
            assert r.activations == by_hand(spec, r.tokens)
        if spec["kind"] in ("digits", "capitalised", "position"):  # word lists need whole-word tokens
            assert record.max_activation == 1.0
    # filtered by neurons.indices, and reloaded from the run dir on resume
    cfg.neurons.which, cfg.neurons.indices = "list", [1, 4]
    assert subject.select(cfg.neurons, 0) == [NeuronId(0, 1), NeuronId(0, 4)]
    again = subject.records(neurons, instantiate(cfg.corpus), cfg.recording, cfg.seed, tmp_path)
    assert [r.to_json() for r in again] == [r.to_json() for r in records]


def test_bad_rules_are_clear():
    with pytest.raises(UserError, match="kind 'colour' is unknown"):
        SyntheticSubject([{"kind": "colour", "explanation": "x"}])
    with pytest.raises(UserError, match="no explanation"):
        SyntheticSubject([{"kind": "digits"}])
    with pytest.raises(UserError, match="bad settings"):
        SyntheticSubject([{"kind": "regex", "pattern": "(", "explanation": "x"}])


def _neuron(i: int, pairs) -> NeuronRecord:
    rec = ActivationRecord([t for t, _ in pairs], [a for _, a in pairs])
    return NeuronRecord(NeuronId(0, i), most_positive_activation_records=[rec])


def test_top_tokens_lists_the_highest_mean_tokens():
    records = [ActivationRecord([" cat", " sat", " cat", " on", "\n"], [9.0, 0.0, 7.0, 1.0, 10.0]),
               ActivationRecord([" on", " the", " mat"], [3.0, 0.0, 0.0])]
    out = TopTokens(n=2, min_count=2).explain(NeuronId(0, 0), records)
    assert out.explanations == ('the tokens "cat", "on"',)  # "\n" is blank; "mat" seen once
    assert TopTokens(n=2, min_count=1).explain(NeuronId(0, 0), records).explanations == ('the tokens "cat", "on"',)
    assert TopTokens().explain(NeuronId(0, 0), [ActivationRecord([" a"], [0.0])]).explanations == ()


def test_top_tokens_names_whole_characters_not_byte_tokens():
    # "🙂" split into two byte tokens (each "\ufffd" alone), read whole on the first
    joined = ActivationRecord([" x", "\ufffd", "\ufffd", " y"], [0.1, 2.0, 1.0, 0.5],
                              text=(" x", "🙂", "", " y"))
    assert TopTokens(n=2, min_count=1).explain(NeuronId(0, 0), [joined]).explanations == ('the tokens "🙂", "y"',)
    bare = ActivationRecord([" x", "\ufffd", "\ufffd", " y"], [0.1, 2.0, 1.0, 0.5])   # no byte info
    assert TopTokens(n=2, min_count=1).explain(NeuronId(0, 0), [bare]).explanations == ('the tokens "y", "x"',)


def test_shuffled_never_keeps_a_neurons_own_explanation():
    neurons = [_neuron(i, [(f" w{i}", 1.0)]) for i in range(7)]
    shuffled = Shuffled(Truth([{"explanation": f"rule {i}"} for i in range(7)]), seed=3)
    shuffled.prepare({n.neuron_id: n.shown(0) for n in neurons})
    given = [shuffled.explain(n.neuron_id, n.shown(0)).explanations[0] for n in neurons]
    assert sorted(given) == sorted(f"rule {i}" for i in range(7))  # a permutation ...
    assert all(g != f"rule {i}" for i, g in enumerate(given))      # ... with no fixed point
    with pytest.raises(UserError, match="at least two neurons"):
        Shuffled(Truth([{"explanation": "x"}])).prepare({neurons[0].neuron_id: neurons[0].shown(0)})


def test_truth_needs_a_synthetic_subject():
    with pytest.raises(UserError, match="subject=synthetic"):
        Truth(None).prepare({NeuronId(0, 0): []})


def test_synthetic_run_with_truth_and_shuffled_truth(tiny_llama_dir, corpus, tmp_path):  # noqa: F811
    # rules that fire on any English text (animals may not occur: a dead unit is not explained)
    common = ["subject=synthetic", f"subject.tokenizer={tiny_llama_dir}", "corpus=files",
              f"corpus.paths=[{corpus}]", f"simulator.model={tiny_llama_dir}",
              "neurons.which=list", "neurons.indices=[0,5,6,7]", "recording.window=16",
              "recording.top_k=8", "recording.n_random=8", "progress=false"]
    truth = pipeline.run(config(common + ["explainer=truth"]), tmp_path / "truth")
    assert truth["n_neurons"] == 4 and truth["subject"] == "synthetic"
    got = {r["index"]: r["explanation"] for r in rows(tmp_path / "truth")}
    assert got == {i: RULES[i]["explanation"] for i in (0, 5, 6, 7)}
    pipeline.run(config(common + ["explainer=shuffled", "explainer@explainer.inner=truth"]),
                 tmp_path / "shuffled")
    got = {r["index"]: r["explanation"] for r in rows(tmp_path / "shuffled")}
    assert sorted(got.values()) == sorted(RULES[i]["explanation"] for i in (0, 5, 6, 7))
    assert all(got[i] != RULES[i]["explanation"] for i in got)
    assert not any("error" in r for r in rows(tmp_path / "shuffled"))
    assert json.loads((tmp_path / "shuffled" / "summary.json").read_text())["n_neurons"] == 4
