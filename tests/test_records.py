"""The data model: OpenAI-compatible JSON both ways, files, and deterministic disjoint splits."""

from __future__ import annotations

import json
import math
import random

import pytest

from neuronlens.records import (
    DEFAULT_FRACTIONS,
    SPLITS,
    ActivationRecord,
    NeuronId,
    NeuronRecord,
    split_of,
)

# A record written by hand in the layout of OpenAI's public neuron-explainer dataset
# (az://openaipublic/neuron-explainer/data/collated-activations/{layer}/{index}.json).
# The floats are chosen so that any lossy conversion shows: 0.1 + 0.2, 1e-300, 5e-324, -3.25.
OPENAI_JSON = r"""
{"dataclass_name": "NeuronRecord",
 "neuron_id": {"dataclass_name": "NeuronId", "layer_index": 5, "neuron_index": 131},
 "random_sample": [
   {"dataclass_name": "ActivationRecord", "tokens": [" the", " cat", "\n", "\u00e9t\u00e9"],
    "activations": [-0.0123, 0.30000000000000004, 0.0, -3.25]},
   {"dataclass_name": "ActivationRecord", "tokens": ["<|endoftext|>", "\t"],
    "activations": [1e-300, -0.16997650265693665]}],
 "random_sample_by_quantile": [
   [{"dataclass_name": "ActivationRecord", "tokens": [" a", " b"], "activations": [-0.5, -0.25]}],
   [{"dataclass_name": "ActivationRecord", "tokens": [" c"], "activations": [0.1]},
    {"dataclass_name": "ActivationRecord", "tokens": [" d", " e", " f"],
     "activations": [5e-324, 2.0, -1.7976931348623157e+308]}]],
 "quantile_boundaries": [-0.16997650265693665, 0.0, 0.30000000000000004, 7.5],
 "mean": -3.25,
 "variance": 0.30000000000000004,
 "skewness": 1e-300,
 "kurtosis": 12.000000000000002,
 "most_positive_activation_records": [
   {"dataclass_name": "ActivationRecord", "tokens": [" dog", " barks"],
    "activations": [7.5, -0.0625]},
   {"dataclass_name": "ActivationRecord", "tokens": [" x"], "activations": [6.25]}]}
"""

TOP_KEYS = {"dataclass_name", "neuron_id", "random_sample", "random_sample_by_quantile",
            "quantile_boundaries", "mean", "variance", "skewness", "kurtosis",
            "most_positive_activation_records"}


def _record() -> NeuronRecord:
    return NeuronRecord(
        NeuronId(3, 17),
        most_positive_activation_records=[ActivationRecord([" a", "b"], [2.5, -0.5])],
        random_sample=[ActivationRecord(["c"], [0.1 + 0.2])],
        random_sample_by_quantile=[[ActivationRecord(["q"], [-1.0])]],
        quantile_boundaries=[0.0, 1.5],
        mean=0.25, variance=1.5, skewness=-0.75, kurtosis=3.0)


def test_to_json_uses_openai_field_names():
    d = _record().to_json()
    assert set(d) == TOP_KEYS
    assert d["dataclass_name"] == "NeuronRecord"
    assert d["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 3, "neuron_index": 17}
    assert d["most_positive_activation_records"] == [
        {"dataclass_name": "ActivationRecord", "tokens": [" a", "b"], "activations": [2.5, -0.5]}]
    assert d["random_sample"] == [
        {"dataclass_name": "ActivationRecord", "tokens": ["c"], "activations": [0.1 + 0.2]}]
    assert d["random_sample_by_quantile"] == [
        [{"dataclass_name": "ActivationRecord", "tokens": ["q"], "activations": [-1.0]}]]
    assert (d["quantile_boundaries"], d["mean"], d["variance"], d["skewness"], d["kurtosis"]) == (
        [0.0, 1.5], 0.25, 1.5, -0.75, 3.0)
    json.dumps(d, allow_nan=False)  # plain JSON types only


def test_openai_literal_reads_and_writes_back_exactly():
    original = json.loads(OPENAI_JSON)
    rec = NeuronRecord.from_json(original)

    # field for field, floats compared exactly
    assert rec.neuron_id == NeuronId(5, 131)
    assert rec.mean == -3.25 and rec.variance == 0.1 + 0.2
    assert rec.skewness == 1e-300 and rec.kurtosis == 12.000000000000002
    assert rec.quantile_boundaries == [-0.16997650265693665, 0.0, 0.1 + 0.2, 7.5]
    assert [r.tokens for r in rec.random_sample] == [[" the", " cat", "\n", "été"],
                                                    ["<|endoftext|>", "\t"]]
    assert rec.random_sample[0].activations == [-0.0123, 0.1 + 0.2, 0.0, -3.25]
    assert rec.random_sample[1].activations == [1e-300, -0.16997650265693665]
    assert [[r.activations for r in q] for q in rec.random_sample_by_quantile] == [
        [[-0.5, -0.25]], [[0.1], [5e-324, 2.0, -1.7976931348623157e308]]]
    assert [r.tokens for r in rec.most_positive_activation_records] == [[" dog", " barks"], [" x"]]
    assert rec.max_activation == 7.5

    written = rec.to_json()
    assert written == original
    again = json.loads(json.dumps(written))
    assert again == original
    assert NeuronRecord.from_json(again) == rec


def test_save_and_load_through_a_file(tmp_path):
    rec = NeuronRecord.from_json(json.loads(OPENAI_JSON))
    path = tmp_path / "deep" / "5" / "131.json"
    rec.save(path)
    assert json.loads(path.read_text()) == json.loads(OPENAI_JSON)
    loaded = NeuronRecord.load(path)
    assert loaded == rec
    assert loaded.random_sample[0].activations[1] == 0.30000000000000004


def test_missing_optional_fields_default():
    rec = NeuronRecord.from_json({"neuron_id": {"layer_index": 0, "neuron_index": 2}})
    assert rec.neuron_id == NeuronId(0, 2)
    assert rec.most_positive_activation_records == [] and rec.random_sample == []
    assert rec.random_sample_by_quantile is None and rec.quantile_boundaries is None
    assert math.isnan(rec.mean)


@pytest.mark.parametrize("text", [
    "not json at all",
    "",
    '{"neuron_id": {"layer_index": 1',
    "{}",
    '{"neuron_id": null}',
    "[]",
    '"a string"',
    '{"neuron_id": {"layer_index": "five", "neuron_index": 0}}',
    '{"neuron_id": {"layer_index": 1, "neuron_index": 0},'
    ' "random_sample": [{"tokens": ["a"], "activations": []}]}',
])
def test_malformed_file_gives_value_error_naming_the_path(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        NeuronRecord.load(path)
    assert str(path) in str(info.value)


def test_activation_record_length_mismatch():
    with pytest.raises(ValueError, match="2 tokens but 1 activations"):
        ActivationRecord(["a", "b"], [1.0])


# ---------------------------------------------------------------------------------------------
# Splits


def _random_records(rng: random.Random, n: int) -> list[ActivationRecord]:
    vocab = [" the", " cat", "a", "b", "\n", "1", "2", " dog", "é", "<|endoftext|>"]
    return [ActivationRecord([rng.choice(vocab) for _ in range(8)],
                             [rng.uniform(-1, 5) for _ in range(8)]) for _ in range(n)]


def test_split_of_is_deterministic_and_depends_on_tokens_and_seed_only():
    rng = random.Random(1)
    records = _random_records(rng, 200)
    first = [split_of(r) for r in records]
    assert first == [split_of(r, 0) for r in records]
    assert set(first) == set(SPLITS)
    # same tokens, different activations: same split
    assert first == [split_of(ActivationRecord(r.tokens, [0.0] * len(r.tokens))) for r in records]
    # another seed reshuffles
    assert first != [split_of(r, 1) for r in records]


def test_every_excerpt_in_exactly_one_split():
    rng = random.Random(2)
    rec = NeuronRecord(NeuronId(0, 0), most_positive_activation_records=_random_records(rng, 60),
                       random_sample=_random_records(rng, 60))
    tops = [rec.split(s).top for s in SPLITS]
    rnds = [rec.split(s).random for s in SPLITS]
    assert sum(map(len, tops)) == 60 and sum(map(len, rnds)) == 60
    for records, parts in ((rec.most_positive_activation_records, tops),
                           (rec.random_sample, rnds)):
        for r in records:
            assert sum(any(r is x for x in part) for part in parts) == 1
    for s, top, rnd in zip(SPLITS, tops, rnds):
        assert all(split_of(r) == s for r in top + rnd)
        assert rec.split(s).all == top + rnd


def test_same_tokens_same_split_across_neurons_and_lists():
    rng = random.Random(3)
    shared = _random_records(rng, 50)
    # neuron A has the excerpts as top records, neuron B as random ones (other activations)
    a = NeuronRecord(NeuronId(0, 1), most_positive_activation_records=shared)
    b = NeuronRecord(NeuronId(4, 9), random_sample=[
        ActivationRecord(list(r.tokens), [-x for x in r.activations]) for r in shared])
    for s in SPLITS:
        assert [r.tokens for r in a.split(s).top] == [r.tokens for r in b.split(s).random]
        assert a.split(s).random == [] and b.split(s).top == []


def test_splits_disjoint_across_neurons_and_fractions_honoured():
    rng = random.Random(4)
    pool = _random_records(rng, 2000)
    keys = {r.key() for r in pool}
    assert len(keys) == 2000  # the property below is about distinct excerpts
    neurons = []
    for n in range(6):  # each neuron draws overlapping top/random excerpts from the pool
        top = rng.sample(pool, 150)
        rnd = rng.sample(pool, 150)
        neurons.append(NeuronRecord(NeuronId(n % 2, n), most_positive_activation_records=top,
                                    random_sample=rnd))
    union = {s: set() for s in SPLITS}
    for nr in neurons:
        for s in SPLITS:
            union[s] |= {r.key() for r in nr.split(s).all}
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1:]:
            assert not union[s] & union[t], (s, t)

    counts = {s: 0 for s in SPLITS}
    for r in pool:
        counts[split_of(r)] += 1
    for s in SPLITS:
        assert abs(counts[s] / len(pool) - DEFAULT_FRACTIONS[s]) < 0.05, counts


def test_custom_fractions_are_normalised_and_may_leave_splits_empty():
    rng = random.Random(5)
    pool = _random_records(rng, 1000)
    got = [split_of(r, 0, {"train": 3.0, "test": 1.0}) for r in pool]
    assert set(got) == {"train", "test"}
    assert abs(got.count("train") / len(got) - 0.75) < 0.05


def test_unknown_split_name_raises():
    with pytest.raises(ValueError, match="bogus"):
        _record().split("bogus")
