"""The report's statistics against scipy on fixed data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sp

from neuronlens import stats


@pytest.fixture
def data():
    rng = np.random.default_rng(123)
    b = rng.normal(0.3, 0.2, size=40)
    a = b + 0.1 + rng.normal(0, 0.05, size=40)
    return a, b


def scipy_ci(values, statistic):
    res = sp.bootstrap((np.asarray(values),), statistic, n_resamples=10_000, confidence_level=0.95,
                       method="percentile", random_state=np.random.default_rng(0))
    return res.confidence_interval.low, res.confidence_interval.high


@pytest.mark.parametrize("statistic", [np.mean, np.median])
def test_bootstrap_ci_is_scipys_with_the_same_seed(data, statistic):
    a, _ = data
    ci = stats.bootstrap_ci(a, statistic)
    assert (ci.low, ci.high) == pytest.approx(scipy_ci(a, statistic), abs=1e-12)
    assert ci.low < statistic(a) < ci.high


def test_summary_numbers(data):
    a, _ = data
    s = stats.summarise(a)
    assert s.n == 40 and s.mean == pytest.approx(np.mean(a)) and s.median == pytest.approx(np.median(a))
    assert (s.median_ci.low, s.median_ci.high) == pytest.approx(scipy_ci(a, np.median))
    assert stats.summarise([]) == stats.Summary(0, None, None, None, None)
    one = stats.summarise([0.5])
    assert one.mean == 0.5 and one.mean_ci is None  # no interval from one neuron


def test_paired_tests_are_scipys(data):
    a, b = data
    p = stats.paired(a, b)
    assert p.n == 40 and p.mean_diff == pytest.approx(np.mean(a - b))
    assert p.wilcoxon_p == pytest.approx(sp.wilcoxon(a, b).pvalue)
    assert p.ttest_p == pytest.approx(sp.ttest_rel(a, b).pvalue)
    assert (p.ci.low, p.ci.high) == pytest.approx(scipy_ci(a - b, np.mean))  # paired bootstrap


def test_paired_ci_contains_the_true_difference_and_not_zero():
    rng = np.random.default_rng(7)
    b = rng.uniform(-0.2, 0.8, size=200)
    noise = rng.normal(0, 0.05, size=200)
    a = b + 0.25 + noise - noise.mean()  # the mean difference is exactly 0.25
    p = stats.paired(a, b)
    assert p.mean_diff == pytest.approx(0.25)
    assert p.ci.low < 0.25 < p.ci.high and p.ci.low > 0
    assert p.wilcoxon_p < 1e-6 and p.ttest_p < 1e-6


def test_a_known_zero_difference_has_a_ci_around_zero():
    rng = np.random.default_rng(3)
    b = rng.uniform(0, 1, size=60)
    noise = rng.normal(0, 0.1, size=60)
    a = b + noise - noise.mean()
    p = stats.paired(a, b)
    assert p.mean_diff == pytest.approx(0, abs=1e-12)
    assert p.ci.low < 0 < p.ci.high
    assert p.wilcoxon_p > 0.05 and p.ttest_p > 0.05


def test_undefined_tests_are_none_not_nan():
    same = stats.paired([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert same.mean_diff == 0 and same.ci is None and same.wilcoxon_p is None and same.ttest_p is None
    shifted = stats.paired([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])  # every difference the same
    assert shifted.ttest_p is None and shifted.ci is None
    assert shifted.wilcoxon_p == pytest.approx(sp.wilcoxon([0.5] * 3).pvalue)
    assert stats.paired([], []).n == 0
    with pytest.raises(ValueError):
        stats.paired([1.0], [1.0, 2.0])


def test_agreement_is_scipys_spearman(data):
    a, b = data
    ag = stats.agreement(a, b)
    ref = sp.spearmanr(a, b)
    assert ag.n == 40 and ag.spearman == pytest.approx(ref.statistic) and ag.p == pytest.approx(ref.pvalue)
    assert stats.agreement([0.1, 0.1, 0.1], [0.1, 0.2, 0.3]).spearman is None


def test_agreement_interval_resamples_neurons_and_drops_undefined_resamples():
    """The interval against scipy's Spearman on each resample of the same draws (pairs kept
    together), skipping those where one side is constant; it holds 0 for unrelated scores and not
    for related ones."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=12)
    y = x + rng.normal(scale=0.5, size=12)
    picks = np.random.default_rng(stats.SEED).integers(0, 12, size=(stats.N_RESAMPLES, 12))
    rhos = [sp.spearmanr(x[p], y[p]).statistic for p in picks]
    rhos = [r for r in rhos if np.isfinite(r)]
    ci = stats.agreement(x, y).ci
    assert ci.low == pytest.approx(np.percentile(rhos, 2.5)) and ci.high == pytest.approx(np.percentile(rhos, 97.5))
    assert ci.low > 0
    unrelated = stats.agreement(x, rng.normal(size=12)).ci
    assert unrelated.low < 0 < unrelated.high
    tied = stats.agreement([0.0] * 9 + [1.0], [0.0] * 8 + [1.0, 0.0])   # most resamples constant
    assert tied.spearman is not None and tied.ci is None


def test_difference_of_independent_samples():
    """Unpaired: each sample resampled on its own; swapping the samples negates everything, and
    a clear shift is found while one inside the noise is not."""
    from neuronlens.stats import difference

    rng = np.random.default_rng(1)
    a, b = rng.normal(0.3, 0.1, 20), rng.normal(0.0, 0.1, 30)
    d, back = difference(a, b), difference(b, a)
    assert d.n_a == 20 and d.n_b == 30
    assert d.mean_diff == pytest.approx(a.mean() - b.mean())
    assert d.ci.low > 0.2 and d.ci.high < 0.4 and d.p < 1e-6
    assert back.mean_diff == pytest.approx(-d.mean_diff)
    assert back.ci.low == pytest.approx(-d.ci.high, abs=0.02) and back.p == pytest.approx(d.p)
    same = difference(rng.normal(0, 1, 15), rng.normal(0, 1, 15))
    assert same.ci.low < 0 < same.ci.high
    assert difference([1.0], [0.0, 1.0]).mean_diff is None
