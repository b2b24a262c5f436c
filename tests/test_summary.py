"""The run's numbers: every simulated neuron counts in the headline mean (a constant simulation
as 0, flagged), the mean over defined scores beside it, digit mass summarised and flagged, copies
of the prompt flagged; one rule for the run, the merged shards and best-of-n."""

from __future__ import annotations

import pytest

from neuronlens.explainers.llm import FEWSHOT, copied_example, copy_flag
from neuronlens.scorers.correlation import correlate
from neuronlens.summary import LOW_MASS, headline, mass_stats, summarise_rows


def row(score_: float | None, flag: str | None = None, mass: float | None = None, **extra) -> dict:
    return {"layer": 0, "index": 0, "score": score_, "score_flag": flag,
            "mass": None if mass is None else {"mean": mass, "min": mass / 2}, **extra}


def test_constant_simulations_count_as_zero_in_the_headline_mean():
    one_good = [row(0.989, mass=0.4), row(0.0, "constant simulation", mass=0.3),
                row(0.0, "constant simulation", mass=0.01),
                row(None, error="the explainer failed", failures={"by_kind": {"timeout": 1}})]
    s = summarise_rows(one_good)
    assert s["mean_score"] == pytest.approx(0.989 / 3)          # not 0.989
    assert s["mean_defined_score"] == pytest.approx(0.989)
    assert (s["n_neurons"], s["n_scored"], s["n_constant"], s["n_failed"]) == (4, 3, 2, 1)
    assert s["failures_by_kind"] == {"timeout": 1}
    assert s["mass"] == {"median_of_means": 0.3, "min": 0.005, "n_low": 1}
    assert 0.01 < LOW_MASS < 0.3


def test_the_headline_of_a_score_follows_its_flag():
    constant = correlate([[0, 1, 2]], [[1, 1, 1]]).to_json()
    assert constant["correlation"] is None and headline(constant) == 0.0
    dead = correlate([[2, 2, 2]], [[0, 1, 2]]).to_json()
    assert headline(dead) is None      # constant true activations: nothing to correlate with
    assert headline(correlate([[0, 1, 2]], [[0, 1, 3]]).to_json()) == pytest.approx(0.9819805)


def test_judges_are_summarised_by_the_same_rule():
    rows = [row(0.5, judges={"e": {"score": 0.0, "score_flag": "constant simulation"}}),
            row(0.7, judges={"e": {"score": 0.4, "mass": {"mean": 0.9, "min": 0.8}}})]
    judged = summarise_rows(rows)["judges"]["e"]
    assert judged["mean_score"] == pytest.approx(0.2) and judged["mean_defined_score"] == pytest.approx(0.4)
    assert judged["n_constant"] == 1 and judged["mass"]["n_low"] == 0


def test_mass_stats_over_scored_tokens():
    assert mass_stats([{"mass": [0.5, 0.1]}, {"mass": None}, {"mass": [0.3]}]) == {"mean": 0.3, "min": 0.1}
    assert mass_stats([{"tokens": ["a"]}]) is None


def test_copies_of_few_shot_answers_and_of_the_instructions_are_flagged():
    first = FEWSHOT[0][1]
    assert copy_flag(first.upper() + ".") == f"copies the example answer {first!r}"
    assert copied_example("opening brackets and parentheses in code") == FEWSHOT[1][1]   # one word apart
    assert copy_flag("how strongly it responds") == "repeats the instructions"
    for own in ("days of the week", "closing brackets", "words about food", "the token"):
        assert copy_flag(own) is None, own
