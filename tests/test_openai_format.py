"""OpenAI's neuron-explainer formats in and out: records read and written back exactly, a run on
their records with their explanations (no subject model), and scored simulations exported in
their ``NeuronSimulationResults`` shape."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import neuronlens.pipeline as pipeline
from neuronlens.conf import CONF_DIR
from neuronlens.errors import UserError
from neuronlens.explainers.loaded import LoadedExplainer, MissingExplanation
from neuronlens.report.openai_format import export_run
from neuronlens.records import NeuronId, NeuronRecord
from neuronlens.scorers.correlation import openai_dispersion
from neuronlens.subject.openai_records import OpenAIRecordsSubject

WORDS = [" the", " cat", " sat", " on", " mat", ".", "\n", " dog", " barked", " at", " a", " bird",
         ",", " and", " then", " ran", " away", " <b>", "é", " 1", "9", "\t"]
NEURON_KEYS = ["dataclass_name", "neuron_id", "random_sample", "random_sample_by_quantile",
               "quantile_boundaries", "mean", "variance", "skewness", "kurtosis",
               "most_positive_activation_records"]


def _record(rng: random.Random, fires_on: str) -> dict:
    """One excerpt of 48-64 tokens; the neuron fires on ``fires_on``, slightly negative elsewhere."""
    tokens = [rng.choice(WORDS) for _ in range(rng.randint(48, 64))]
    acts = [rng.uniform(2.0, 9.0) if t == fires_on else rng.uniform(-0.17, 0.05) for t in tokens]
    return {"dataclass_name": "ActivationRecord", "tokens": tokens, "activations": acts}


def openai_neuron(layer: int, index: int, n_top: int = 16, n_random: int = 8, seed: int = 0) -> dict:
    """A NeuronRecord as OpenAI's files hold it (their key order, dataclass_name everywhere)."""
    rng = random.Random(f"{seed}/{layer}/{index}")
    fires_on = WORDS[(layer * 7 + index) % 5 + 1]
    top = sorted((_record(rng, fires_on) for _ in range(n_top)), key=lambda r: -max(r["activations"]))
    return {"dataclass_name": "NeuronRecord",
            "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": index},
            "random_sample": [_record(rng, "never") for _ in range(n_random)],
            "random_sample_by_quantile": [[_record(rng, "never")], [_record(rng, fires_on)] * 2],
            "quantile_boundaries": [-0.16997650265693665, 0.0, 0.30000000000000004, 9.0],
            "mean": -0.0123456789012345, "variance": 0.30000000000000004,
            "skewness": 5e-324, "kurtosis": 12.000000000000002,
            "most_positive_activation_records": top}


def write_folder(root: Path, neurons: list[tuple[int, int]]) -> Path:
    for layer, index in neurons:
        path = root / str(layer) / f"{index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(openai_neuron(layer, index)))
    return root


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_round_trip_is_exact_field_for_field(tmp_path):
    original = openai_neuron(5, 131)
    text = json.dumps(original)
    record = NeuronRecord.from_json(json.loads(text))
    back = record.to_json()
    assert back == original and list(back) == NEURON_KEYS
    assert json.dumps(back) == text  # same floats, digit for digit, same order, same types
    assert record.neuron_id == NeuronId(5, 131)
    assert any(a < 0 for r in record.random_sample for a in r.activations)
    assert [len(q) for q in record.random_sample_by_quantile] == [1, 2]
    assert all(48 <= len(r.tokens) <= 64 for r in record.most_positive_activation_records)

    folder = write_folder(tmp_path / "records", [(5, 131)])
    loaded = OpenAIRecordsSubject(str(folder)).load(NeuronId(5, 131))
    assert json.dumps(loaded.to_json()) == text
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == text


@pytest.fixture(scope="module")
def openai_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """A run on OpenAI-format records with explanations from a CSV (one neuron left out), the tiny
    model as simulator; no subject model anywhere."""
    tmp = tmp_path_factory.mktemp("openai-run")
    folder = write_folder(tmp / "records", [(3, 1), (3, 40), (4, 2), (7, 9)])
    table = tmp / "explanations.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "index", "explanation"])
        writer.writerow([3, 1, "the word cat, <i>mostly</i>"])
        writer.writerow([3, 1, "animals"])                  # a second candidate for the same neuron
        writer.writerow([4, 2, "full stops, \"quoted\""])   # (3, 40) has none: a failed row
        writer.writerow([7, 9, "not asked for"])            # filtered out by neurons.layers
    cfg = config(["subject=openai_records", f"subject.path={folder}", "subject.device=cpu",
                  "explainer=load", f"explainer.path={table}", f"simulator.model={tiny_llama_dir}",
                  "neurons.layers=[3,4]", "progress=false"])
    pipeline.run(cfg, tmp / "run")
    return tmp / "run"


def _rows(run_dir: Path) -> dict[tuple[int, int], dict]:
    rows = [json.loads(line) for line in (run_dir / "neurons.jsonl").read_text().splitlines()]
    return {(r["layer"], r["index"]): r for r in rows}


def test_run_on_openai_records_with_loaded_explanations(openai_run):
    rows = _rows(openai_run)
    assert set(rows) == {(3, 1), (3, 40), (4, 2)}
    assert rows[(3, 40)]["score"] is None
    assert rows[(3, 40)]["error"].endswith("no explanation for L3/N40 in " +
                                           str(openai_run.parent / "explanations.csv"))
    assert rows[(3, 1)]["explanation"] in {"the word cat, <i>mostly</i>", "animals"}
    assert [c["text"] for c in rows[(3, 1)]["explanations"]] == ["the word cat, <i>mostly</i>", "animals"]
    assert all("valid" in c for c in rows[(3, 1)]["explanations"])  # best of two, chosen on valid
    assert rows[(4, 2)]["explanation"] == 'full stops, "quoted"'
    assert rows[(4, 2)]["usage"]["explainer"] == [0, 0]
    record = NeuronRecord.from_json(openai_neuron(4, 2))
    record.split_scheme = "openai"   # the default for OpenAI's records (scoring.splits=auto)
    excerpts = {tuple(r.tokens): r.activations for r in record.split("test").all}
    assert len(rows[(4, 2)]["test_excerpts"]) == len(record.split("test").all)
    for ex in rows[(4, 2)]["test_excerpts"]:
        assert excerpts[tuple(ex["tokens"])] == ex["true"]  # true activations, exact
    summary = json.loads((openai_run / "summary.json").read_text())
    assert summary["n_neurons"] == 3 and summary["n_failed"] == 1
    assert summary["subject"].startswith("openai_records:")


def test_viewer_of_a_run_on_openai_records(openai_run, tmp_path):
    from neuronlens.report.site import NEGATIVE, page_name, write_site

    index = write_site(openai_run, tmp_path / "site")
    assert f"LoadedExplainer {openai_run.parent / 'explanations.csv'}" in index.read_text()
    page = (index.parent / "neurons" / page_name(4, 2)).read_text()
    assert "rgba({}, {}, {}".format(*NEGATIVE) in page  # negative activations, their own hue
    assert "&lt;i&gt;mostly&lt;/i&gt;" in (index.parent / "neurons" / page_name(3, 1)).read_text()


def test_export_reads_back_as_neuron_simulation_results(openai_run, tmp_path):
    paths = export_run(openai_run)
    rows = _rows(openai_run)
    assert sorted(paths) == sorted(openai_run / "openai" / str(l) / f"{i}.jsonl"
                                   for (l, i), r in rows.items() if r["score"] is not None)
    for path in paths:
        lines = path.read_text().splitlines()
        assert len(lines) == 1  # OpenAI's explanation files hold one line
        result = json.loads(lines[0])
        row = rows[(result["neuron_id"]["layer_index"], result["neuron_id"]["neuron_index"])]
        assert result["dataclass_name"] == "NeuronSimulationResults"
        assert result["neuron_id"]["dataclass_name"] == "NeuronId"
        (explanation,) = result["scored_explanations"]
        assert explanation["dataclass_name"] == "ScoredExplanation"
        assert explanation["explanation"] == row["explanation"]
        scored = explanation["scored_simulation"]
        assert scored["dataclass_name"] == "ScoredSimulation"
        assert scored["ev_correlation_score"] == row["score"]
        r2, _ = openai_dispersion([e["true"] for e in row["test_excerpts"]],
                                  [e["simulated"] for e in row["test_excerpts"]])
        assert scored["rsquared_score"] == r2   # OpenAI's definition (uncentred), not ours
        sequences = scored["scored_sequence_simulations"]
        assert len(sequences) == len(row["test_excerpts"])
        for seq, ex in zip(sequences, row["test_excerpts"]):
            assert seq["dataclass_name"] == "ScoredSequenceSimulation"
            assert set(seq) == {"dataclass_name", "simulation", "true_activations",
                                "ev_correlation_score", "rsquared_score",
                                "absolute_dev_explained_score"}
            sim = seq["simulation"]
            assert sim["dataclass_name"] == "SequenceSimulation"
            assert sim["tokens"] == ex["tokens"] and sim["expected_activations"] == ex["simulated"]
            assert sim["activation_scale"] == "simulated_normalized_activations"
            # each token's distribution over 0..10, renormalised: its mean is the expected value
            values, probs = sim["distribution_values"], sim["distribution_probabilities"]
            assert len(values) == len(probs) == len(ex["tokens"])
            for v, p, expected in zip(values, probs, ex["simulated"]):
                assert len(v) == len(p) and set(v) <= {float(i) for i in range(11)}
                assert sum(p) == pytest.approx(1.0, abs=0.006)   # 11 values to 3 decimals
                assert sum(a * b for a, b in zip(v, p)) == pytest.approx(expected, abs=0.03)
            assert sim["uncalibrated_simulation"] is None
            assert seq["true_activations"] == ex["true"]
            assert seq["ev_correlation_score"] is None or -1 <= seq["ev_correlation_score"] <= 1

    # the export is OpenAI's explanations layout: explainer=load reads it back
    loaded = LoadedExplainer(str(openai_run / "openai"))
    assert loaded.explain(NeuronId(4, 2), []).explanations == (rows[(4, 2)]["explanation"],)
    with pytest.raises(MissingExplanation, match="no explanation for L3/N40"):
        loaded.explain(NeuronId(3, 40), [])
    assert export_run(openai_run, tmp_path / "elsewhere")[0].is_relative_to(tmp_path / "elsewhere")


def test_calibrated_rows_export_calibrated_expectations(tmp_path):
    from neuronlens.report.openai_format import simulation_results

    row = {"layer": 1, "index": 2, "explanation": "x", "score": 1.0,
           "scores": {"test": {"all": {"correlation": 1.0, "r_squared": -3.0,
                                       "absolute_dev_explained": -1.0}},
                      "calibration": {"slope": 0.5, "intercept": -1.0},
                      "test_calibrated": {"correlation": 1.0, "r_squared": 1.0,
                                          "absolute_dev_explained": 1.0}},
           "test_excerpts": [{"kind": "top", "tokens": ["a", "b"], "true": [0.0, 1.0],
                              "simulated": [2.0, 4.0]}]}
    scored = simulation_results(row)["scored_explanations"][0]["scored_simulation"]
    sim = scored["scored_sequence_simulations"][0]["simulation"]
    assert sim["expected_activations"] == [0.0, 1.0] and sim["activation_scale"] == "neuron_activations"
    assert sim["uncalibrated_simulation"]["expected_activations"] == [2.0, 4.0]
    assert scored["rsquared_score"] == 1.0


def test_openai_explanations_jsonl_and_our_rows_load(tmp_path):
    nsr = {"dataclass_name": "NeuronSimulationResults",
           "neuron_id": {"dataclass_name": "NeuronId", "layer_index": 0, "neuron_index": 5},
           "scored_explanations": [{"dataclass_name": "ScoredExplanation",
                                    "explanation": " the  letter e", "scored_simulation": {}}]}
    ours = {"layer": 1, "index": 6, "explanation": "dates", "score": 0.3}
    failed = {"layer": 1, "index": 7, "explanation": None, "score": None, "error": "x"}
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in (nsr, ours, failed)) + "\n")
    loaded = LoadedExplainer(str(path))
    assert loaded.lookup(NeuronId(0, 5)) == ["the letter e"]
    assert loaded.lookup(NeuronId(1, 6)) == ["dates"]
    assert loaded.lookup(NeuronId(1, 7)) == []


def test_clear_errors(tmp_path):
    neurons = OmegaConf.create({"layers": None, "which": "random", "indices": [], "per_layer": 8})
    with pytest.raises(UserError, match="is not a folder"):
        OpenAIRecordsSubject(str(tmp_path / "missing")).select(neurons, 0)
    with pytest.raises(UserError, match="holds no neuron records"):
        OpenAIRecordsSubject(str(tmp_path)).select(neurons, 0)

    folder = write_folder(tmp_path / "records", [(2, 3)])
    subject = OpenAIRecordsSubject(str(folder))
    with pytest.raises(UserError, match=r"No neuron matches neurons.layers=\[9\].*layers \[2\]"):
        subject.select(OmegaConf.merge(neurons, {"layers": [9]}), 0)
    (folder / "2" / "4.json").write_text('{"dataclass_name": "NeuronRecord", "neuron_id": ')
    (folder / "2" / "5.json").write_text('{"dataclass_name": "NeuronRecord", "neuron_id": {}}')
    (folder / "2" / "6.json").write_text(json.dumps(openai_neuron(2, 3)))  # wrong neuron inside
    assert subject.select(neurons, 0) == [NeuronId(2, i) for i in (3, 4, 5, 6)]
    with pytest.raises(UserError, match=r"4\.json is not an OpenAI-format NeuronRecord"):
        subject.records([NeuronId(2, 4)], run_dir=tmp_path)
    with pytest.raises(UserError, match=r"5\.json is not an OpenAI-format NeuronRecord"):
        subject.records([NeuronId(2, 5)], run_dir=tmp_path)
    with pytest.raises(UserError, match="holds the record of L2/N3, not of L2/N6"):
        subject.records([NeuronId(2, 6)], run_dir=tmp_path)

    url = OpenAIRecordsSubject("http://127.0.0.1:9/collated-activations/")  # nothing listens there
    with pytest.raises(UserError, match="cannot be listed"):
        url.select(neurons, 0)
    listed = OmegaConf.merge(neurons, {"layers": [5], "which": "list", "indices": [131]})
    assert url.select(listed, 0) == [NeuronId(5, 131)]
    with pytest.raises(UserError, match=r"^Could not download the record of L5/N131 from http.*without network"):
        url.records([NeuronId(5, 131)], run_dir=tmp_path)

    with pytest.raises(UserError, match="does not exist"):
        LoadedExplainer(str(tmp_path / "nope.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,neuron_index,text\n1,2,x\n")
    with pytest.raises(UserError, match="header row with the columns layer, index and explanation"):
        LoadedExplainer(str(bad))
    bad.write_text("layer,index,explanation\n1,two,x\n")
    with pytest.raises(UserError, match="line 2: layer and index must be whole numbers"):
        LoadedExplainer(str(bad))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"layer": 1, "index": 2, "explanation": "ok"}\n{"layer": 1,\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        LoadedExplainer(str(bad))
    bad.write_text('{"layer": 1, "explanation": "no index"}\n')
    with pytest.raises(UserError, match="line 1 has neither layer/index/explanation"):
        LoadedExplainer(str(bad))


def test_missing_path_is_demanded_by_hydra():
    cfg = config(["subject=openai_records", "explainer=load"])
    assert OmegaConf.is_missing(cfg.subject, "path") and OmegaConf.is_missing(cfg.explainer, "path")
