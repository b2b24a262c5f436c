"""neuronlens beside its reference: OpenAI's neuron-explainer, as Neuronpedia maintains it on PyPI
(``automated-interpretability``, imported as ``neuron_explainer``), used only as an installed
library. Its loaders read what neuronlens writes (recorded neurons, exported scored simulations),
and its scoring, given the same true and simulated activations, gives neuronlens' correlations.

The package pins ``numpy<2`` (and blobfile 2, which pins lxml 4 and filelock 3): pip installs it
beside neuronlens' dependencies only by taking numpy back to 1.26 (and pandas to 3.0), although the
parts used here run on numpy 2. So it is not a dependency of neuronlens; where it is wanted, install
it without its pins (tiktoken, httpx, scikit-learn and aiohttp come with neuronlens already):

    pip install --no-deps automated-interpretability==0.0.24 blobfile==2.1.1 \
        boostedblob==0.15.6 "orjson>=3.10,<4" "lxml~=4.9"

Every test here is skipped when ``neuron_explainer`` does not import.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "neuron_explainer.explanations.scoring",
    reason="the reference (pip install --no-deps automated-interpretability, see this file's "
           "docstring) is not installed")

from neuron_explainer.activations.activations import (  # noqa: E402
    ActivationRecord as TheirActivationRecord,
)
from neuron_explainer.activations.activations import (  # noqa: E402
    NeuronRecord as TheirNeuronRecord,
)
from neuron_explainer.activations.activations import load_neuron, read_neuron_file  # noqa: E402
from neuron_explainer.explanations.explanations import (  # noqa: E402
    ActivationScale,
    NeuronSimulationResults,
    SequenceSimulation,
    load_neuron_explanations,
)
from neuron_explainer.explanations.scoring import (  # noqa: E402
    aggregate_scored_sequence_simulations,
    correlation_score,
    simulate_and_score,
)
from neuron_explainer.explanations.simulator import NeuronSimulator  # noqa: E402

from agreement import correlation_rounding, mean_rounding  # noqa: E402
from neuronlens.records import NeuronId  # noqa: E402
from neuronlens.scorers.correlation import correlate  # noqa: E402

NEURONS = [NeuronId(0, 3), NeuronId(1, 17), NeuronId(2, 40)]


# ---- neuronlens' records, read by the reference ------------------------------------------------

@pytest.fixture(scope="module")
def recording(tiny_llama, tiny_tokenizer):
    """The tiny random Llama recorded over the built-in corpus: real neurons, real tokens."""
    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.subject.recording import RecordingConfig, record

    windows = token_windows(BuiltinCorpus(), tiny_tokenizer, 24, max_windows=120)
    return record(tiny_llama, tiny_tokenizer, windows, NEURONS,
                  RecordingConfig(top_k=20, n_random=16, batch_size=16), progress=False)


def same_records(theirs: Sequence[TheirActivationRecord], ours) -> None:
    assert len(theirs) == len(ours)
    for t, o in zip(theirs, ours):
        assert isinstance(t, TheirActivationRecord)
        assert t.tokens == o.tokens and t.activations == o.activations   # exact, float for float


def test_their_loaders_read_our_recorded_neurons(recording, tmp_path):
    paths = recording.export_openai(tmp_path / "records")
    ours = {r.neuron_id: r for r in recording.neuron_records()}
    assert len(paths) == len(ours) == len(NEURONS)
    for n in NEURONS:
        # the synchronous loader takes a folder URL ({layer}/{index}.json under it) ...
        theirs = load_neuron(n.layer, n.index, dataset_path=(tmp_path / "records").as_uri())
        # ... the asynchronous one a file name (through boostedblob)
        again = asyncio.run(read_neuron_file(str(tmp_path / "records" / str(n.layer)
                                                 / f"{n.index}.json")))
        for t in (theirs, again):
            assert isinstance(t, TheirNeuronRecord)
            assert (t.neuron_id.layer_index, t.neuron_id.neuron_index) == (n.layer, n.index)
            o = ours[n]
            same_records(t.most_positive_activation_records, o.most_positive_activation_records)
            same_records(t.random_sample, o.random_sample)
            assert t.max_activation == o.max_activation > 0
            for moment in ("mean", "variance", "skewness", "kurtosis"):
                assert getattr(t, moment) == getattr(o, moment)


# ---- a neuronlens run, exported, read and re-scored by the reference ---------------------------

@pytest.fixture(scope="module")
def exported_run(recording, tiny_llama_dir, tmp_path_factory) -> Path:
    """A neuronlens run on the recorded neurons (explanations from a table, the tiny Llama as the
    simulator, all at once), exported in OpenAI's explanations layout."""
    from hydra import compose, initialize_config_dir

    import neuronlens.pipeline as pipeline
    from neuronlens.conf import CONF_DIR
    from neuronlens.report.openai_format import export_run

    tmp = tmp_path_factory.mktemp("peer-run")
    recording.export_openai(tmp / "records")
    table = tmp / "explanations.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "index", "explanation"])
        for n, words in zip(NEURONS, ("commas and full stops", "the word the", "numbers")):
            writer.writerow([n.layer, n.index, words])
    overrides = ["subject=openai_records", f"subject.path={tmp / 'records'}", "subject.device=cpu",
                 "explainer=load", f"explainer.path={table}", f"simulator.model={tiny_llama_dir}",
                 f"neurons.layers=[{','.join(str(n.layer) for n in NEURONS)}]", "progress=false"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    pipeline.run(cfg, tmp / "run")
    assert export_run(tmp / "run"), "the run scored no neuron"
    return tmp / "run"


def test_published_explanations_rescored_with_the_references_prompt(exported_run, tiny_llama_dir):
    """The same records and explanations through ``simulation.prompt=openai``: every neuron is
    scored, the run says which prompt it used, and the prompt changes the simulation."""
    from hydra import compose, initialize_config_dir

    import neuronlens.pipeline as pipeline
    from neuronlens.conf import CONF_DIR
    from neuronlens.files import read_rows

    tmp = exported_run.parent
    overrides = ["subject=openai_records", f"subject.path={tmp / 'records'}", "subject.device=cpu",
                 "explainer=load", f"explainer.path={tmp / 'explanations.csv'}",
                 f"simulator.model={tiny_llama_dir}", "simulation.prompt=openai", "judges=null",
                 "judge_power.enabled=false",
                 f"neurons.layers=[{','.join(str(n.layer) for n in NEURONS)}]", "progress=false"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    summary = pipeline.run(cfg, tmp / "reference-prompt")
    assert summary["n_scored"] == len(NEURONS) and summary["n_failed_excerpts"] == 0
    experiment = json.loads((tmp / "reference-prompt" / "experiment.json").read_text())
    assert experiment["simulation"]["prompt"] == "openai"
    ours = {(r["layer"], r["index"]): r for r in read_rows(exported_run / "neurons.jsonl")}
    for row in read_rows(tmp / "reference-prompt" / "neurons.jsonl"):
        default = ours[(row["layer"], row["index"])]
        assert [e["tokens"] for e in row["test_excerpts"]] == [e["tokens"] for e in default["test_excerpts"]]
        assert [e["simulated"] for e in row["test_excerpts"]] != [e["simulated"] for e in default["test_excerpts"]]


def test_their_loader_reads_our_export_and_their_scoring_agrees(exported_run):
    rows = [json.loads(line) for line in (exported_run / "neurons.jsonl").read_text().splitlines()]
    scored = [r for r in rows if r.get("score") is not None]
    assert scored, "no neuron of the run has a score to compare"
    for row in scored:
        results = load_neuron_explanations(str(exported_run / "openai"), row["layer"], row["index"])
        assert isinstance(results, NeuronSimulationResults)
        assert (results.neuron_id.layer_index, results.neuron_id.neuron_index) == \
            (row["layer"], row["index"])
        (explanation,) = results.scored_explanations
        assert explanation.explanation == row["explanation"]
        sequences = explanation.scored_simulation.scored_sequence_simulations
        assert [s.simulation.tokens for s in sequences] == [e["tokens"] for e in row["test_excerpts"]]

        # their aggregate over the sequences they loaded is our score, stored and recomputed
        theirs = aggregate_scored_sequence_simulations(sequences)
        true = [a for e in row["test_excerpts"] for a in e["true"]]
        sim = [a for e in row["test_excerpts"] for a in e["simulated"]]
        # float64 by two implementations: within the rounding derived in tests/agreement.py
        assert theirs.ev_correlation_score == pytest.approx(row["score"], abs=correlation_rounding(true, sim))
        assert explanation.get_preferred_score() == row["score"]
        # r² and absolute-dev-explained in the export are theirs (uncentred), to the last digit
        stored = explanation.scored_simulation
        assert stored.rsquared_score == pytest.approx(
            theirs.rsquared_score, abs=mean_rounding(len(true), theirs.rsquared_score))
        assert stored.absolute_dev_explained_score == pytest.approx(
            theirs.absolute_dev_explained_score, abs=mean_rounding(len(true), theirs.absolute_dev_explained_score))
        for s in sequences:
            with np.errstate(all="ignore"):   # theirs divides 0 by 0 on an all-zero excerpt
                again = aggregate_scored_sequence_simulations([s]).rsquared_score
            if s.rsquared_score is None:
                assert not math.isfinite(again)
            else:
                assert s.rsquared_score == pytest.approx(again, abs=mean_rounding(len(s.true_activations), again))
        ours = correlate([e["true"] for e in row["test_excerpts"]],
                     [e["simulated"] for e in row["test_excerpts"]])
        assert ours.correlation == row["score"]
        for s in sequences:
            mine = correlate([s.true_activations], [s.simulation.expected_activations]).correlation
            if mine is None:
                assert s.ev_correlation_score is None
            else:
                assert correlation_score(s.true_activations, s.simulation.expected_activations) \
                    == pytest.approx(mine, abs=correlation_rounding(s.true_activations,
                                                                   s.simulation.expected_activations))


# ---- the reference's scoring on the same data --------------------------------------------------

class Replay(NeuronSimulator):
    """A simulator that answers with given expected activations, excerpt by excerpt (by tokens)."""

    def __init__(self, simulated: dict[tuple[str, ...], list[float]]):
        self.simulated = simulated

    async def simulate(self, tokens: Sequence[str]) -> SequenceSimulation:
        return SequenceSimulation(
            tokens=list(tokens), expected_activations=self.simulated[tuple(tokens)],
            activation_scale=ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS,
            distribution_values=[], distribution_probabilities=[])


def excerpts(seed: int, n: int = 6) -> tuple[list[TheirActivationRecord], list[list[float]]]:
    """Excerpts of different lengths with a sparse neuron, and a noisy 0-10 simulation of it."""
    rng = random.Random(seed)
    records, simulated = [], []
    for i in range(n):
        length = rng.randint(5, 40)
        true = [rng.uniform(2, 9) if rng.random() < 0.15 else rng.uniform(-0.2, 0.1)
                for _ in range(length)]
        sim = [min(10.0, max(0.0, t + rng.gauss(0, 2))) for t in true]
        records.append(TheirActivationRecord(tokens=[f"{seed}.{i}.{j}" for j in range(length)],
                                             activations=true))
        simulated.append(sim)
    return records, simulated


@pytest.mark.parametrize("seed", range(5))
def test_their_scoring_gives_our_scores(seed):
    records, simulated = excerpts(seed)
    simulator = Replay({tuple(r.tokens): s for r, s in zip(records, simulated)})
    theirs = asyncio.run(simulate_and_score(simulator, records))
    true = [r.activations for r in records]
    ours = correlate(true, simulated)
    assert ours.flag is None and ours.n_excerpts == len(records)
    assert theirs.ev_correlation_score == pytest.approx(ours.correlation, abs=correlation_rounding(
        np.concatenate(true), np.concatenate(simulated)))
    # over all tokens concatenated, not the mean of the excerpts' correlations
    per_excerpt = [s.ev_correlation_score for s in theirs.scored_sequence_simulations]
    assert not math.isclose(float(np.nanmean(per_excerpt)), ours.correlation, abs_tol=1e-6)
    # r² and absolute-dev-explained differ by their denominators alone: the reference divides by
    # the uncentred mean(true²) and mean(|true|), neuronlens by var(true) and mean(|true - mean|)
    t = np.concatenate(true)
    assert theirs.rsquared_score == pytest.approx(
        1 - (1 - ours.r_squared) * np.var(t) / np.mean(t ** 2), abs=mean_rounding(t.size, theirs.rsquared_score))
    assert theirs.absolute_dev_explained_score == pytest.approx(
        1 - (1 - ours.absolute_dev_explained) * np.mean(np.abs(t - t.mean())) / np.mean(np.abs(t)),
        abs=mean_rounding(t.size, theirs.absolute_dev_explained_score))


def test_where_their_correlation_is_nan_ours_is_none_with_a_reason():
    true = [[0.0, 1.0, 3.0], [0.5, 0.0]]
    with np.errstate(all="ignore"):   # numpy warns of the 0/0 it turns into NaN
        flat = correlation_score(sum(true, []), [2.0] * 5)
    assert math.isnan(flat)
    ours = correlate(true, [[2.0] * 3, [2.0] * 2])
    assert ours.correlation is None and ours.flag == "constant simulation"
    with np.errstate(all="ignore"):
        assert math.isnan(correlation_score([1.0] * 4, [0.0, 1.0, 2.0, 3.0]))
    dead = correlate([[1.0] * 4], [[0.0, 1.0, 2.0, 3.0]])
    assert dead.correlation is None and dead.flag == "constant activations"


@pytest.mark.slow
def test_their_echo_simulator_reads_neuronlens_serve_on_emoji_and_cjk(monkeypatch):
    """OpenAI's all-at-once simulator client (legacy ``echo`` + ``logprobs=15``) against
    neuronlens-serve on the embedded SmolLM2 (their parser needs "unknown" to be one token):
    characters split into byte tokens come back as ``bytes:\\xNN`` tokens, as the legacy API sent
    them, so their parser merges them and simulates every token."""
    from neuron_explainer.api_client import ApiClient
    from neuron_explainer.explanations.simulator import ExplanationNeuronSimulator

    from neuronlens.serve import start_server

    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    tokens = ["The", " café", " 🙂", " 日本", " costs", " 9", " €", "."]
    with start_server("embedded", device="cpu") as server:
        simulator = ExplanationNeuronSimulator(server.model, "emoji and currency symbols")
        simulator.api_client = ApiClient(model_name=server.model, base_api_url=server.base_url)
        result = asyncio.run(simulator.simulate(tokens))
    assert result.tokens == tokens
    assert len(result.expected_activations) == len(tokens)
    assert all(0.0 <= v <= 10.0 for v in result.expected_activations)


@pytest.mark.slow
def test_the_reference_prompt_simulates_as_their_own_simulator_does(monkeypatch):
    """``simulation.prompt=openai``: the same prompt (theirs, built by their package), read at the
    same places, gives their expected values. Theirs come from the top 15 logprobs of one token
    (so "10", two tokens for SmolLM2, never counts); ours from every candidate exactly."""
    from neuron_explainer.api_client import ApiClient
    from neuron_explainer.explanations.simulator import ExplanationNeuronSimulator

    from neuronlens.backends.local import LocalBackend
    from neuronlens.records import ActivationRecord
    from neuronlens.scorers.reference_prompt import reference_request
    from neuronlens.serve import start_server
    from neuronlens.scorers.simulation import Simulator
    from neuronlens.scorers.strategies import NUMBERS as CANDIDATES

    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    explanation = "numbers and prices"
    tokens = ["It", " costs", " 9", "9", " dollars", ",", " or", " 12", " euros", ".", "\n", "Cheap", "!"]
    with start_server("embedded", device="cpu") as server:
        theirs = ExplanationNeuronSimulator(server.model, explanation)
        theirs.api_client = ApiClient(model_name=server.model, base_api_url=server.base_url)
        expected = asyncio.run(theirs.simulate(tokens))
    request = reference_request(explanation, tokens, CANDIDATES)
    assert request.prompt == theirs.make_simulation_prompt(tokens)
    assert [request.prompt[p:p + 7] for p in request.positions] == ["unknown"] * len(tokens)
    backend = LocalBackend(model="embedded", device="cpu")
    backend.load()
    ours = Simulator(backend, "all_at_once", prompt="openai").simulate(
        explanation, [ActivationRecord(tokens, [0.0] * len(tokens))])
    assert len(ours.distributions[0]) == len(expected.distribution_values) == len(tokens)
    for token, d, values, probs in zip(tokens, ours.distributions[0], expected.distribution_values,
                                       expected.distribution_probabilities):
        if not values:   # theirs: a newline folded into the line before, given 0 and no distribution
            assert "\n" in token
            continue
        # their reading: the digits in the top 15 of one token, renormalised; a first token "1"
        # is 1, so our "10" counts as 1 there
        mine = [d[int(v)] + (d[10] if v == 1 else 0.0) for v in values]
        assert np.allclose(np.array(mine) / sum(mine), probs, atol=2e-3), (token, mine, probs)


# ---- the reference's splits --------------------------------------------------------------------

@pytest.mark.parametrize("n_top, n_random", [(40, 50), (48, 30), (8, 2)])
def test_openai_splits_are_the_references_slices_one_to_one(n_top, n_random):
    from neuron_explainer.activations.activations import ActivationRecordSliceParams

    from neuronlens.records import SPLITS, ActivationRecord, NeuronRecord

    rng = random.Random(n_top)
    top = [ActivationRecord([f"t{i}"], [100.0 - i]) for i in range(n_top)]
    rnd = [ActivationRecord([f"r{i}"], [rng.random()]) for i in range(n_random)]
    ours = NeuronRecord(NeuronId(0, 0), top, rnd, split_scheme="openai")
    from neuron_explainer.activations.activations import NeuronId as TheirNeuronId

    theirs = TheirNeuronRecord(
        neuron_id=TheirNeuronId(layer_index=0, neuron_index=0),
        most_positive_activation_records=[TheirActivationRecord(r.tokens, r.activations) for r in top],
        random_sample=[TheirActivationRecord(r.tokens, r.activations) for r in rnd])
    n = min(n_top // 4, n_random // 3) or n_top // 4
    params = ActivationRecordSliceParams(n_examples_per_split=n)
    tokens = lambda records: [r.tokens for r in records]  # noqa: E731
    assert tokens(ours.split("train").all) == tokens(theirs.train_activation_records(params))
    if n_random // 3:
        for name in ("calibration", "valid", "test"):
            got = ours.split(name)
            assert tokens(got.all) == tokens(getattr(theirs, f"{name}_activation_records")(params))
            assert len(got.top) == len(got.random) == n   # 1:1
    seen = {r.key() for r in ours.shown()}
    for name in SPLITS[1:]:   # what an explainer saw is never scored
        assert not seen & {r.key() for r in ours.split(name).all}
