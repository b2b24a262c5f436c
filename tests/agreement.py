"""What two runs of one experiment promise each other, checked with bounds derived here, never
with a tolerance seen on one machine.

A resumed run and an uninterrupted one, the shards of a run and the whole run, a run through the
HTTP backends and a local one: each computes every neuron from the same inputs (the same
excerpts, the same prompts, the same explanation), but not always by the same float32
operations. Which excerpts share a forward pass, how much of a prompt's prefix is kept from the
previous call, the thread count and the CPU's kernels all change the order of float32 sums, and
a float32 sum depends on its order. So no test compares such floats for equality. The promise,
and how it is checked:

1. **Values.** Every true and every simulated activation of a neuron agrees with the other run's
   within ``REL`` of its scale: the neuron's largest |activation| for the true ones, the 0-10
   scale for the simulated ones.

   ``REL = 1e-4`` is about 1700 float32 unit roundoffs (u = 2**-24 = 6.0e-8). Summing m terms
   in another order moves the result by at most m*u of the sum of their magnitudes, and by about
   sqrt(m)*u when the roundings' signs are independent, as they are in practice (Higham, Accuracy
   and Stability of Numerical Algorithms, 2nd ed., sections 2.8 and 3.1). The tiny test models
   chain about 25 reductions of at most ~1000 terms per value (attention over a ~900-token
   simulator prompt, 32- and 64-wide projections): sqrt(25 * 1000) * u = 1e-5 of the scale, and
   a softmax turns a logit's error into a relative error of the probabilities of at most twice
   as much. REL leaves a factor of five above that. A real difference (another excerpt, another
   explanation, a token out of place) moves a value by a good part of the values' spread, which
   ``well_conditioned`` requires to be at least ``MIN_SPREAD`` of the scale: 500 times REL.

2. **Scores.** A correlation is the cosine of the centred vectors x~ and y~, so when the inputs
   move by a and b, |r' - r| <= 2|a~|/|x~| + 2|b~|/|y~| (``correlation_bound``; proof there),
   plus float64 rounding of the score itself. The bound is computed from the two runs' own
   values, so it adapts to the data: tiny where the activations vary, large where they are
   nearly constant. A random tiny model simulates nearly constant values (they vary by ~5e-4 on
   the 0-10 scale), and there float32 rounding alone moves a correlation by ~1e-3: such a score
   is noise either way, and it is why a test must run on ``well_conditioned`` data to check
   anything. A mean over neurons moves by at most the mean of their bounds.

``NEURONLENS_TEST_OVERRIDES`` (Hydra overrides, space-separated, e.g.
``recording.batch_size=3 simulator.batch_size=2``) is added to the runs of the tests that use
``extra_overrides()``, to check the promise under other batch shapes.
"""

from __future__ import annotations

import math
import os

import numpy as np

U32 = 2.0 ** -24      # float32 unit roundoff
U64 = 2.0 ** -53      # float64 unit roundoff
REL = 1e-4            # a value's tolerance, relative to its scale (see above)
SIM_SCALE = 10.0      # simulated activations are on a 0-10 scale
MIN_SPREAD = 0.05     # well conditioned: the values' standard deviation is at least this of their scale


def extra_overrides() -> list[str]:
    return os.environ.get("NEURONLENS_TEST_OVERRIDES", "").split()


def _centred(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v - v.mean()


def correlation_bound(x, y, x2, y2) -> float:
    """How far corr(x2, y2) may be from corr(x, y) when x2 and y2 differ from x and y by
    rounding only.

    With u = x~/|x~|, v = y~/|y~| (x~ = x - mean(x)) and r = u.v: r' - r = (u' - u).v' + u.(v' - v),
    so |r' - r| <= |u' - u| + |v' - v|; and |p/|p| - q/|q|| <= |p - q|/|p| + |q| * ||q| - |p||/(|p||q|)
    <= 2|p - q|/|p|. Centring is a projection, so |x2~ - x~| <= |x2 - x|. The last term is the
    float64 evaluation of both scores (n terms: n * 2**-53 each, a factor 10 to spare)."""
    x, y, x2, y2 = (np.asarray(v, dtype=np.float64) for v in (x, y, x2, y2))
    xc, yc = _centred(x), _centred(y)
    nx, ny = np.linalg.norm(xc), np.linalg.norm(yc)
    if nx == 0 or ny == 0:
        return math.inf   # a constant vector: the correlation is undefined, nothing to bound
    return float(2 * np.linalg.norm(_centred(x2) - xc) / nx + 2 * np.linalg.norm(_centred(y2) - yc) / ny
                 + 20 * x.size * U64)


def correlation_rounding(x, y) -> float:
    """How far two float64 evaluations of corr(x, y) on the same values (two implementations,
    two summation orders) may differ. Centring n values costs each up to n*u*max|v| (u = 2**-53,
    Higham section 3.1), which moves r by at most 2*n*u*max|v|/std(v) (``correlation_bound``);
    twice that for two evaluations, plus the sums of products' own n*u."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    n = x.size
    ratio = sum(np.abs(v).max() / v.std() for v in (x, y))
    return float(4 * n * U64 * ratio + 4 * n * U64)


def mean_rounding(n: int, scale: float) -> float:
    """How far two float64 evaluations of a ratio of means of n terms (an r-squared, an
    absolute-deviation score) of magnitude ``scale`` may differ: n*u each, relative (Higham 3.1),
    for each of the two means, in two evaluations."""
    return float(4 * n * U64 * max(1.0, abs(scale)))


def _flat(excerpts, key: str) -> np.ndarray:
    return np.concatenate([np.asarray(e[key], dtype=np.float64) for e in excerpts])


def _scores_agree(label: str, score, other, bound: float) -> None:
    if score is None or other is None:
        assert score is None and other is None, (label, score, other)
        return
    if math.isinf(bound):   # undefined correlation: the headline rule gives both the same value
        assert score == other, (label, score, other)
        return
    assert abs(score - other) <= bound, f"{label}: {score} against {other}, beyond the bound {bound:.3g}"


def well_conditioned(row: dict) -> bool:
    """The neuron's true and simulated activations vary by at least MIN_SPREAD of their scale,
    so that a correlation of them is not magnified rounding."""
    true, sim = _flat(row["test_excerpts"], "true"), _flat(row["test_excerpts"], "simulated")
    scale = np.abs(true).max()
    return bool(scale > 0 and true.std() >= MIN_SPREAD * scale and sim.std() >= MIN_SPREAD * SIM_SCALE)


def assert_rows_agree(rows: dict, others: dict, *, require_conditioned: bool = True) -> dict[str, list[float]]:
    """Rows of two runs of one experiment, keyed alike: the same neurons, explanations and
    excerpts, values within REL of their scale and scores within their derived bounds (the
    main simulator's and each judge's). ``require_conditioned``: every neuron's data must be
    ``well_conditioned`` (one whose true activations are exactly constant, a rule neuron that
    never fires on its test excerpts, has an undefined score in both runs and is exempt), so that
    the check has teeth. Returns the per-neuron bounds, per scorer
    ("simulator" or the judge's name), for ``assert_means_agree``."""
    assert rows.keys() == others.keys()
    bounds: dict[str, list[float]] = {}
    conditioned = 0
    for key, row in rows.items():
        other = others[key]
        assert row["explanation"] == other["explanation"], key
        if row["explanation"] is None:
            continue
        ex, ox = row["test_excerpts"], other["test_excerpts"]
        assert [(e["kind"], e["tokens"]) for e in ex] == [(e["kind"], e["tokens"]) for e in ox], key
        if not ex:   # every excerpt failed, in both runs: no score
            assert row["score"] is None and other["score"] is None, key
            continue
        true, true2 = _flat(ex, "true"), _flat(ox, "true")
        sim, sim2 = _flat(ex, "simulated"), _flat(ox, "simulated")
        scale = np.abs(true).max()
        assert np.abs(true - true2).max() <= REL * scale, (key, "true activations")
        assert np.abs(sim - sim2).max() <= REL * SIM_SCALE, (key, "simulated activations")
        if require_conditioned and np.ptp(true) > 0:   # constant: undefined in both runs, no rounding
            assert well_conditioned(row), (f"{key}: too little spread for the check to mean anything "
                                           f"(true {true.std():.3g} of {scale:.3g}, simulated {sim.std():.3g})")
            conditioned += 1
        bound = correlation_bound(true, sim, true2, sim2)
        _scores_agree(f"{key} simulator", row["score"], other["score"], bound)
        bounds.setdefault("simulator", []).append(bound)
        for name, judged in (row.get("judges") or {}).items():
            theirs = other["judges"][name]
            mine_sims, their_sims = judged["test_simulated"], theirs["test_simulated"]
            assert [s is None for s in mine_sims] == [s is None for s in their_sims], (key, name)
            kept = [i for i, s in enumerate(mine_sims) if s is not None]
            if not kept:
                continue
            jt = np.concatenate([ex[i]["true"] for i in kept])
            jt2 = np.concatenate([ox[i]["true"] for i in kept])
            js = np.concatenate([mine_sims[i] for i in kept])
            js2 = np.concatenate([their_sims[i] for i in kept])
            assert np.abs(js - js2).max() <= REL * SIM_SCALE, (key, name)
            jbound = correlation_bound(jt, js, jt2, js2)
            _scores_agree(f"{key} judge {name}", judged["score"], theirs["score"], jbound)
            bounds.setdefault(name, []).append(jbound)
    assert conditioned or not require_conditioned, "no neuron whose activations vary: nothing was checked"
    return bounds


def assert_means_agree(mean, other, bounds: list[float]) -> None:
    """Two runs' mean scores over the same neurons: within the mean of the neurons' bounds."""
    if mean is None or other is None:
        assert mean is None and other is None
        return
    finite = [b for b in bounds if math.isfinite(b)]   # undefined scores are the same in both
    allowed = sum(finite) / max(len(bounds), 1) + 20 * max(len(bounds), 1) * U64
    assert abs(mean - other) <= allowed, f"mean {mean} against {other}, beyond {allowed:.3g}"
