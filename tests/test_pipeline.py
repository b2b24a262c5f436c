"""The whole run on tiny models: outputs follow the contract, and an interrupted run resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import neuronlens.pipeline as pipeline
from agreement import assert_means_agree, assert_rows_agree, extra_overrides
from neuronlens.conf import CONF_DIR


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def tiny_run_config(model_dir: Path, corpus: Path, simulator: Path | None = None, extra: list[str] = ()):
    return config([
        f"subject.model={model_dir}", "subject.device=cpu",
        "corpus=files", f"corpus.paths=[{corpus}]",
        f"explainer.model={model_dir}", f"simulator.model={simulator or model_dir}",
        "neurons.layers=[1]", "neurons.per_layer=4", "recording.top_k=12",
        "recording.n_random=12", "recording.window=16", "explain.max_tokens=8", "progress=false",
        *extra,
    ])


@pytest.fixture
def corpus(tmp_path) -> Path:
    from itertools import islice

    from neuronlens.corpus import BuiltinCorpus

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(islice(BuiltinCorpus().texts(), 60)))
    return path


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "neurons.jsonl").read_text().splitlines()]


def test_every_config_option_composes_and_instantiates(tmp_path):
    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF_DIR.iterdir()
              if p.is_dir() and p.name not in ("hydra", "experiment")}
    assert {"subject", "corpus", "explainer", "simulator"} <= set(groups)
    for group, options in groups.items():
        for option in options:
            (tmp_path / "a.txt").write_text("Some text.")
            extra = [f"corpus.paths=[{tmp_path / 'a.txt'}]"] if (group, option) == ("corpus", "files") else []
            cfg = config([f"{group}={option}", *extra])
            if group != "subject" and not OmegaConf.missing_keys(cfg[group]):  # e.g. load's path
                assert instantiate(cfg[group]) is not None, (group, option)


def test_run_writes_contract_files(tiny_llama_dir, corpus, tmp_path):
    cfg = tiny_run_config(tiny_llama_dir, corpus)
    summary = pipeline.run(cfg, tmp_path / "run")
    out = rows(tmp_path / "run")
    assert len(out) == 4 and summary["n_neurons"] == 4
    explained = [row for row in out if row["explanation"] is not None]
    assert explained, "no neuron was explained: the test would check nothing"
    for row in out:
        assert {"layer", "index", "explanation"} <= set(row)
        assert len(row["logits"]["promoted"]) == len(row["logits"]["suppressed"]) == 10
        assert row["logits"]["promoted"][0][1] > 0 > row["logits"]["suppressed"][0][1]
        assert 0 < row["density"] < 1
        if row["explanation"] is None:   # a failure says why
            assert row["error"] and row["error_kind"]
    for row in explained:
        assert "correlation" in row["scores"]["test"]["all"] and row["test_excerpts"]
        assert all(len(e["true"]) == len(e["simulated"]) == 16 for e in row["test_excerpts"])
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"n_neurons", "n_failed", "mean_score", "tokens"} <= set(saved)
    assert saved["tokens"]["simulator"]["prompt"] > 0


@pytest.mark.parametrize("n", [1, 3])
def test_neurons_in_flight_and_best_of_n_keep_the_best_candidate_on_valid(tiny_llama_dir, corpus, tmp_path, n):
    """concurrency=3 on the local backends: the calls of the neurons in flight go together
    (``Gather``: the excerpts of every neuron scored in one call, greedy explanations decoded
    together where the backend batches them); the same answers as one neuron at a time. With
    explain.n=3 the candidates are scored together (``score_many``), and each neuron keeps its
    best on valid."""
    from neuronlens.summary import headline

    cfg = tiny_run_config(tiny_llama_dir, corpus, extra=[f"explain.n={n}", "concurrency=3"])
    pipeline.run(cfg, tmp_path / "run")
    explained = [row for row in rows(tmp_path / "run") if row["explanation"] is not None]
    assert explained, "no neuron was explained: the test would check nothing"
    if n == 1:
        pipeline.run(tiny_run_config(tiny_llama_dir, corpus), tmp_path / "one")
        one = {(r["layer"], r["index"]): r for r in rows(tmp_path / "one")}
        for row in explained:
            alone = one[(row["layer"], row["index"])]
            assert row["explanation"] == alone["explanation"]
            assert row["score"] == pytest.approx(alone["score"], abs=1e-4)
        return
    assert any(len(row["explanations"]) > 1 for row in explained), "no neuron had candidates to rank"
    for row in explained:
        candidates = row["explanations"]
        assert all("valid" in c for c in candidates)
        if len(candidates) > 1:
            value = [headline(c["valid"], row["metric"]) for c in candidates]
            best = candidates[max(range(len(candidates)), key=lambda k: -2.0 if value[k] is None else value[k])]
            assert row["explanation"] == best["text"]
        assert row["scores"]["test"]["all"]


def test_interrupted_run_resumes_without_duplicates(tiny_llama_dir, sharp_llama_dir, corpus, tmp_path,
                                                   monkeypatch):
    # a simulator whose predictions vary, so that the scores can be compared (tests/agreement.py)
    cfg = tiny_run_config(tiny_llama_dir, corpus, simulator=sharp_llama_dir, extra=extra_overrides())
    full = pipeline.run(cfg, tmp_path / "full")
    reference = {(r["layer"], r["index"]): r for r in rows(tmp_path / "full")}

    real_process, calls = pipeline.process, []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed while the third neuron is in flight
        return real_process(*args, **kwargs)

    monkeypatch.setattr(pipeline, "process", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path / "resumed")
    assert len(rows(tmp_path / "resumed")) == 2
    with open(tmp_path / "resumed" / "neurons.jsonl", "a") as f:
        f.write('{"layer": 1, "ind')  # a line cut off mid-write by the kill

    monkeypatch.setattr(pipeline, "process", real_process)
    again = pipeline.run(cfg, tmp_path / "resumed")
    resumed = [r for r in rows_lenient(tmp_path / "resumed")]
    keys = [(r["layer"], r["index"]) for r in resumed]
    assert len(keys) == len(set(keys)) == 4
    # The resumed neurons are simulated after another kept prompt prefix than in the full run:
    # the same numbers up to float32 rounding, within bounds derived from the values themselves.
    bounds = assert_rows_agree(dict(zip(keys, resumed)), reference)
    assert_means_agree(again["mean_score"], full["mean_score"], bounds["simulator"])
    for name, judged in full["judges"].items():
        assert_means_agree(again["judges"][name]["mean_score"], judged["mean_score"], bounds.get(name, []))


def rows_lenient(run_dir: Path) -> list[dict]:
    return list(pipeline.finished(run_dir / "neurons.jsonl").values())


def test_the_explainer_never_sees_a_valid_or_test_excerpt(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    from neuronlens.explainers.llm import LLMExplainer
    from neuronlens.records import NeuronId

    seen: list[tuple] = []
    records = {}
    real, real_process = LLMExplainer.explain, pipeline.process

    def spy(self, neuron, train):
        seen.append((neuron, list(train)))
        return real(self, neuron, train)

    def process(neuron, *args, **kwargs):
        records[neuron.neuron_id] = neuron
        return real_process(neuron, *args, **kwargs)

    monkeypatch.setattr(LLMExplainer, "explain", spy)
    monkeypatch.setattr(pipeline, "process", process)
    pipeline.run(tiny_run_config(tiny_llama_dir, corpus), tmp_path / "run")
    assert len(seen) == 4
    for neuron_id, shown in seen:
        assert type(neuron_id) is NeuronId   # the id only: nothing else of the record
        neuron = records[neuron_id]
        held_out = {r.key() for name in ("valid", "test", "calibration") for r in neuron.split(name).all}
        assert held_out and shown
        assert not held_out & {r.key() for r in shown}
        assert {r.key() for r in shown} <= {r.key() for r in neuron.split("train").all}


def test_revision_keeps_the_better_on_valid_and_shows_only_excerpts_the_explainer_saw(
        tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """explain.revisions=2: the explainer gets its explanation simulated on the train excerpts it
    was shown, worst first, and writes another; each revision is stored with its valid score, the
    better one is kept (a tie keeps the older), the same words again are not scored twice, and the
    summary counts how often revision won."""
    from neuronlens.backends.base import Completion, Generation, Usage
    from neuronlens.backends.local import LocalBackend
    from neuronlens.explainers.llm import LLMExplainer

    def scripted(self, request):   # the explainer's backend: a wrong first answer, then the rule
        prompt = request.prompt or request.messages[-1].content
        text = " digits and numbers" if "Current explanation:" in prompt else " the word right after the"
        return Generation((Completion(text),), Usage(50, 5))

    given, records, real_revise, real_process = [], {}, LLMExplainer.revise, pipeline.process

    def spy(self, neuron, explanation, misses):
        given.append((neuron, explanation, list(misses)))
        return real_revise(self, neuron, explanation, misses)

    def process(neuron, *args, **kwargs):
        records[neuron.neuron_id] = neuron
        return real_process(neuron, *args, **kwargs)

    monkeypatch.setattr(LocalBackend, "generate", scripted)
    monkeypatch.setattr(LLMExplainer, "revise", spy)
    monkeypatch.setattr(pipeline, "process", process)
    cfg = config(["subject=synthetic", f"subject.tokenizer={tiny_llama_dir}", "corpus=files",
                  f"corpus.paths=[{corpus}]", f"explainer.model={tiny_llama_dir}", "simulator=similarity",
                  "~judges", "judge_power.enabled=false", "neurons.which=list", "neurons.indices=[0,5]",
                  "recording.window=16", "recording.top_k=12", "recording.n_random=12", "progress=false",
                  "explain.revisions=2"])
    summary = pipeline.run(cfg, tmp_path / "run")
    out = rows(tmp_path / "run")
    assert len(given) == 4 and all(len(r["revisions"]) == 2 for r in out)
    for neuron_id, explanation, misses in given:
        shown = {r.key() for r in records[neuron_id].shown(0)}
        assert misses and {r.key() for r, _ in misses} <= shown   # only what it was shown
        errors = [sum((min(10, max(0, int(10 * a / max(r.max_activation for r, _ in misses)))) - p) ** 2
                      for a, p in zip(r.activations, sims)) / len(sims) for r, sims in misses]
        assert errors == sorted(errors, reverse=True)   # the largest misses first
    for row in out:
        first, second = row["revisions"]
        assert first["revises"] == "the word right after the" and first["text"] == "digits and numbers"
        original = row["explanations"][0]["text"]
        assert original == "the word right after the"
        kept = first["text"] if first["won"] else original
        if first["won"]:   # the same words again: not simulated again, and it cannot win
            assert second["unchanged"] and not second["won"] and second["valid"] == first["valid"]
        assert row["explanation"] == kept
    assert summary["revisions"]["n"] == 4
    assert summary["revisions"]["won"] == sum(r["revisions"][0]["won"] for r in out)
    assert summary["revisions"]["won"] > 0, "revision never won: the test would not check the switch"
