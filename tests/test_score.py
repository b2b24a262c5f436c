"""Scoring tests. Expected values are worked out by hand in the comments, not re-derived."""

from __future__ import annotations

import math

import pytest

from neuronlens.scorers.correlation import (
    Calibration,
    ScoredSimulation,
    correlate,
    fit_calibration,
)
from neuronlens.prompt_format import normalize_activations
from neuronlens.records import ActivationRecord
from neuronlens.scorers.base import Scorer, SimulationResult, split_predictions


def _all_plain_floats(s: ScoredSimulation) -> bool:
    vals = (s.correlation, s.r_squared, s.absolute_dev_explained)
    return all(v is None or (type(v) is float and math.isfinite(v)) for v in vals)


def test_perfect_simulation_scores_one():
    s = correlate([[0, 1, 2], [3]], [[0, 1, 2], [3]])
    assert s.correlation == pytest.approx(1.0)
    assert s.r_squared == pytest.approx(1.0)
    assert s.absolute_dev_explained == pytest.approx(1.0)
    assert (s.n_tokens, s.n_excerpts, s.flag) == (4, 2, None)
    assert _all_plain_floats(s)


def test_hand_computed_example():
    # t = [0,1,2,3], s = [0,2,1,3]; both means 1.5.
    # dt = [-1.5,-.5,.5,1.5], ds = [-1.5,.5,-.5,1.5]
    # sum dt*ds = 2.25 - .25 - .25 + 2.25 = 4; sum dt^2 = sum ds^2 = 5  ->  r = 4/5 = 0.8
    # mean (t-s)^2 = (0+1+1+0)/4 = 0.5; var t = 5/4 = 1.25  ->  r2 = 1 - 0.5/1.25 = 0.6
    # mean |t-s| = 0.5; mean |t-1.5| = (1.5+.5+.5+1.5)/4 = 1  ->  abs dev = 0.5
    s = correlate([[0, 1, 2], [3]], [[0, 2, 1], [3]])
    assert s.correlation == pytest.approx(0.8)
    assert s.r_squared == pytest.approx(0.6)
    assert s.absolute_dev_explained == pytest.approx(0.5)
    assert s.flag is None
    assert _all_plain_floats(s)


def test_negative_correlation():
    # t = [0,1,2], s = [2,1,0]: s = 2 - t  ->  r = -1
    # mean (t-s)^2 = (4+0+4)/3 = 8/3; var t = 2/3  ->  r2 = 1 - 4 = -3
    # mean |t-s| = 4/3; mean |t-1| = 2/3  ->  abs dev = 1 - 2 = -1
    s = correlate([[0, 1, 2]], [[2, 1, 0]])
    assert s.correlation == pytest.approx(-1.0)
    assert s.r_squared == pytest.approx(-3.0)
    assert s.absolute_dev_explained == pytest.approx(-1.0)


def test_r_squared_negative_despite_perfect_correlation():
    # t = [0,1], s = [10,11]: r = 1, but (t-s)^2 = 100 each; var t = 0.25  ->  r2 = 1 - 400 = -399
    # mean |t-s| = 10; mean |t-0.5| = 0.5  ->  abs dev = 1 - 20 = -19
    s = correlate([[0, 1]], [[10, 11]])
    assert s.correlation == pytest.approx(1.0)
    assert s.r_squared == pytest.approx(-399.0)
    assert s.absolute_dev_explained == pytest.approx(-19.0)


def test_correlation_is_over_concatenated_tokens_not_mean_of_excerpts():
    # Per excerpt: [0,1] vs [1,0] and [10,11] vs [11,10] each have r = -1, mean -1.
    # Concatenated: t = [0,1,10,11], s = [1,0,11,10], both means 5.5.
    # dt = [-5.5,-4.5,4.5,5.5], ds = [-4.5,-5.5,5.5,4.5]
    # sum dt*ds = 4 * 24.75 = 99; sum dt^2 = sum ds^2 = 30.25+20.25+20.25+30.25 = 101
    # r = 99/101 = 0.980198...
    true, sim = [[0, 1], [10, 11]], [[1, 0], [11, 10]]
    assert correlate([true[0]], [sim[0]]).correlation == pytest.approx(-1.0)
    assert correlate([true[1]], [sim[1]]).correlation == pytest.approx(-1.0)
    assert correlate(true, sim).correlation == pytest.approx(99 / 101)


def test_constant_simulation_is_flagged():
    # t = [0,1,2], s = [1,1,1] (the mean): r undefined.
    # mean (t-s)^2 = 2/3 = var t  ->  r2 = 0; mean |t-s| = 2/3 = mean |t-1|  ->  abs dev = 0
    s = correlate([[0, 1, 2]], [[1, 1, 1]])
    assert s.correlation is None
    assert s.flag == "constant simulation"
    assert s.r_squared == pytest.approx(0.0)
    assert s.absolute_dev_explained == pytest.approx(0.0)
    # s = [0,0,0]: mean (t-s)^2 = 5/3  ->  r2 = 1 - (5/3)/(2/3) = -1.5;
    # mean |t-s| = 1  ->  abs dev = 1 - 1/(2/3) = -0.5
    s = correlate([[0, 1, 2]], [[0, 0, 0]])
    assert s.correlation is None and s.flag == "constant simulation"
    assert s.r_squared == pytest.approx(-1.5)
    assert s.absolute_dev_explained == pytest.approx(-0.5)
    assert _all_plain_floats(s)


def test_constant_true_activations_are_flagged():
    s = correlate([[2, 2], [2]], [[0, 1], [2]])
    assert (s.correlation, s.r_squared, s.absolute_dev_explained) == (None, None, None)
    assert s.flag == "constant activations"
    assert (s.n_tokens, s.n_excerpts) == (3, 2)
    # 0.1 repeated: its float mean is not exactly 0.1, so a variance test could see noise.
    s = correlate([[0.1, 0.1, 0.1]], [[0.0, 0.5, 1.0]])
    assert s.flag == "constant activations" and s.r_squared is None


def test_no_tokens():
    for true, sim, n_excerpts in (([], [], 0), ([[]], [[]], 1)):
        s = correlate(true, sim)
        assert (s.correlation, s.r_squared, s.absolute_dev_explained) == (None, None, None)
        assert (s.flag, s.n_tokens, s.n_excerpts) == ("no tokens", 0, n_excerpts)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_failed_simulated_token_raises(bad):
    with pytest.raises(ValueError, match=r"simulated activations of excerpt 1 .* token 1.*drop"):
        correlate([[0, 1], [0, 1, 2]], [[0, 1], [0, bad, 2]])


def test_shape_mismatch_names_the_excerpt():
    with pytest.raises(ValueError, match="Excerpt 1 has 3 true activations but 2 simulated"):
        correlate([[0, 1], [0, 1, 2]], [[0, 1], [0, 1]])
    with pytest.raises(ValueError, match="2 true excerpts but 1 simulated"):
        correlate([[0], [1]], [[0]])


class Fixed(Scorer):
    """Predicts what it is given, excerpt by excerpt (None: a failed excerpt)."""

    def __init__(self, predictions):
        self.predictions = predictions

    def simulate(self, explanation, records):
        return SimulationResult(tuple(self.predictions), (None,) * len(records))


def excerpts(*activations) -> list[ActivationRecord]:
    return [ActivationRecord([f"t{i}" for i in range(len(a))], list(a)) for a in activations]


def test_score_splits():
    # top: t = [0,1,2], s = [0,2,1]; dt = [-1,0,1], ds = [-1,1,0]; sum dt*ds = 1, sums sq 2 -> r = 0.5
    # random: one token -> constant activations
    # all: t = [0,1,2,3], s = [0,2,1,3] -> r = 0.8 (see test_hand_computed_example)
    scored = Fixed([(0, 2, 1), (3,)]).score("x", excerpts([0, 1, 2]), excerpts([3]))
    out = scored.scores
    assert set(out) == {"top", "random", "all"} and scored.metric.name == "correlation"
    assert out["top"]["correlation"] == pytest.approx(0.5)
    assert out["random"]["flag"] == "constant activations"
    assert out["all"]["correlation"] == pytest.approx(0.8) and scored.value() == pytest.approx(0.8)
    assert (out["all"]["n_tokens"], out["all"]["n_excerpts"]) == (4, 2)


def test_score_splits_empty_group():
    out = Fixed([(0, 2, 1)]).score("x", excerpts([0, 1, 2]), []).scores
    assert out["random"]["flag"] == "no tokens" and out["random"]["correlation"] is None
    assert out["all"] == out["top"]
    out = Fixed([(0, 2, 1)]).score("x", [], excerpts([0, 1, 2])).scores
    assert out["top"]["flag"] == "no tokens"
    assert out["all"]["correlation"] == pytest.approx(0.5)


def test_failed_excerpts_are_left_out_of_every_split():
    top, rnd = excerpts([0, 1], [5, 5]), excerpts([1, 0], [2, 3])
    kept = split_predictions(top, rnd, [(0, 1), None, None, (2, 3)])
    assert [p.index for p in kept["top"]] == [0] and [p.index for p in kept["random"]] == [3]
    assert [p.index for p in kept["all"]] == [0, 3] and kept["all"][1].predicted == [2, 3]
    scored = Fixed([(0, 1), None, None, (2, 3)]).score("x", top, rnd)
    assert scored.scores["all"]["n_excerpts"] == 2 and scored.scores["top"]["n_excerpts"] == 1


def test_calibration_recovers_exact_linear_relation():
    # true = 2 * sim + 1 exactly
    cal = fit_calibration([[1, 3], [5]], [[0, 1], [2]])
    assert cal.slope == pytest.approx(2.0) and cal.intercept == pytest.approx(1.0)
    assert type(cal.slope) is float and type(cal.intercept) is float
    assert Calibration(2.0, 1.0).apply([[0, 1], [2]]) == [[1.0, 3.0], [5.0]]
    assert cal.to_json() == {"slope": cal.slope, "intercept": cal.intercept}


def test_calibration_least_squares_and_its_effect_on_scores():
    # true [0,2,1] on sim [0,1,2]: slope = sum dt*ds / sum ds^2 = 1/2, intercept = 1 - 0.5*1 = 0.5
    true, sim = [[0, 2, 1]], [[0, 1, 2]]
    cal = fit_calibration(true, sim)
    assert cal.slope == pytest.approx(0.5) and cal.intercept == pytest.approx(0.5)
    # r = 0.5 before and after (positive slope); in-sample OLS r2 = r^2 = 0.25
    calibrated = cal.apply(sim)  # [[0.5, 1.0, 1.5]]
    assert calibrated[0] == pytest.approx([0.5, 1.0, 1.5])
    assert correlate(true, calibrated).correlation == pytest.approx(0.5)
    assert correlate(true, calibrated).r_squared == pytest.approx(0.25)
    # The r2 = -399 case above becomes perfect once calibrated (slope 1, intercept -10).
    cal = fit_calibration([[0, 1]], [[10, 11]])
    assert (cal.slope, cal.intercept) == (pytest.approx(1.0), pytest.approx(-10.0))
    assert correlate([[0, 1]], cal.apply([[10, 11]])).r_squared == pytest.approx(1.0)


def test_calibration_constant_simulation():
    # mean(true) = (0+1+5)/3 = 2
    cal = fit_calibration([[0, 1], [5]], [[4, 4], [4]])
    assert (cal.slope, cal.intercept) == (0.0, pytest.approx(2.0))
    assert cal.apply([[4, 7]]) == [[pytest.approx(2.0), pytest.approx(2.0)]]


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError, match="no tokens"):
        fit_calibration([], [])
    with pytest.raises(ValueError, match="excerpt 0"):
        fit_calibration([[0, 1]], [[0, None]])


def test_normalize_activations():
    # max 1: -1 -> relu 0; 0.25 -> floor(2.5) = 2; 0.5 -> 5; 0.99 -> floor(9.9) = 9; 1 -> 10;
    # 2 -> floor(20) clipped to 10
    out = normalize_activations([-1, 0, 0.25, 0.5, 0.99, 1, 2], 1.0)
    assert out == [0, 0, 2, 5, 9, 10, 10]
    assert all(type(v) is int for v in out)
    # max 4: 3 -> floor(7.5) = 7
    assert normalize_activations([3, 4], 4.0) == [7, 10]
    assert normalize_activations([1, 2], 0.0) == [0, 0]
    assert normalize_activations([-1, -2], -1.0) == [0, 0]
    assert normalize_activations([], 1.0) == []


def test_max_activation_maps_to_ten():
    # 10 * a / a rounds to 9.999... for this a in float64, so floor would give 9.
    a = 0.8146523304343956
    assert normalize_activations([a, a / 2], a) == [10, 5]
