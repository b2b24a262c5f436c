"""Scoring a simulation against the true activations (Bills et al. 2023, section 2.3).

All scores are computed over the tokens of every excerpt concatenated, as OpenAI's
`aggregate_scored_sequence_simulations` does, not averaged per excerpt. An undefined score
(a zero denominator) is `None` with a `flag` saying why; it is never NaN and never a silent 0.

Note on the denominators: the paper's released code divides by the uncentred `mean(true**2)`
and `mean(|true|)` (`openai_dispersion`, used for the OpenAI-format export); `correlate` centres them
(`var(true)` and `mean(|true - mean(true)|)`), i.e. the usual coefficient of determination and its
L1 analogue. Either is only meaningful after calibration: on the simulator's 0-10 scale against
raw activations they are large negative numbers, so the tables and the viewer show them only for
calibrated simulations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ScoredSimulation:
    """The scores of one explanation on one set of excerpts."""

    correlation: float | None
    r_squared: float | None
    absolute_dev_explained: float | None
    n_tokens: int
    n_excerpts: int
    flag: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Calibration:
    """A linear map `true ≈ slope * simulated + intercept`."""

    slope: float
    intercept: float

    def apply(self, simulated: Sequence[Sequence[float]]) -> list[list[float]]:
        """Calibrate every simulated activation (shape preserved)."""
        return [[self.slope * v + self.intercept for v in _finite_values(seq, "simulated", i)]
                for i, seq in enumerate(simulated)]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _finite_values(seq: Sequence[float | None], name: str, index: int) -> list[float]:
    """`seq` as floats; raises ValueError on a None or NaN/inf value."""
    out = []
    for j, v in enumerate(seq):
        if v is None or not math.isfinite(float(v)):
            raise ValueError(
                f"The {name} activations of excerpt {index} have {v!r} at token {j}; drop excerpts "
                f"whose simulation failed (and count them) before scoring.")
        out.append(float(v))
    return out


def _flatten(true: Sequence[Sequence[float]], simulated: Sequence[Sequence[float]]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and values, and concatenate all excerpts into two float64 arrays."""
    if len(true) != len(simulated):
        raise ValueError(f"There are {len(true)} true excerpts but {len(simulated)} simulated "
                         f"ones; they must match one to one.")
    t: list[float] = []
    s: list[float] = []
    for i, (ts, ss) in enumerate(zip(true, simulated)):
        if len(ts) != len(ss):
            raise ValueError(f"Excerpt {i} has {len(ts)} true activations but {len(ss)} "
                             f"simulated ones; they must match one to one.")
        t.extend(_finite_values(ts, "true", i))
        s.extend(_finite_values(ss, "simulated", i))
    return np.asarray(t, dtype=np.float64), np.asarray(s, dtype=np.float64)


def _is_constant(x: np.ndarray) -> bool:
    return bool(np.all(x == x[0]))


def correlate(true: Sequence[Sequence[float]],
          simulated: Sequence[Sequence[float]]) -> ScoredSimulation:
    """Correlation, r² and absolute-dev-explained over all tokens of all excerpts concatenated."""
    t, s = _flatten(true, simulated)
    n_tokens, n_excerpts = int(t.size), len(true)
    if n_tokens == 0:
        return ScoredSimulation(None, None, None, n_tokens, n_excerpts, "no tokens")
    if _is_constant(t):
        return ScoredSimulation(None, None, None, n_tokens, n_excerpts, "constant activations")
    r_squared = float(1.0 - np.mean((t - s) ** 2) / np.var(t))
    abs_dev = float(1.0 - np.mean(np.abs(t - s)) / np.mean(np.abs(t - np.mean(t))))
    if _is_constant(s):
        return ScoredSimulation(None, r_squared, abs_dev, n_tokens, n_excerpts,
                                "constant simulation")
    correlation = float(np.clip(np.corrcoef(t, s)[0, 1], -1.0, 1.0))
    return ScoredSimulation(correlation, r_squared, abs_dev, n_tokens, n_excerpts)


def openai_dispersion(true: Sequence[Sequence[float]], simulated: Sequence[Sequence[float]]
                      ) -> tuple[float | None, float | None]:
    """r² and absolute-dev-explained as OpenAI's reference defines them (for its file format):
    ``1 - mean((t - s)²) / mean(t²)`` and ``1 - mean(|t - s|) / mean(|t|)``, uncentred, over all
    tokens concatenated; None where the denominator is 0."""
    t, s = _flatten(true, simulated)
    if t.size == 0:
        return None, None
    sq, ab = float(np.mean(t ** 2)), float(np.mean(np.abs(t)))
    return (None if sq == 0 else float(1 - np.mean((t - s) ** 2) / sq),
            None if ab == 0 else float(1 - np.mean(np.abs(t - s)) / ab))


def fit_calibration(true: Sequence[Sequence[float]],
                    simulated: Sequence[Sequence[float]]) -> Calibration:
    """Least-squares fit of `true ≈ slope * simulated + intercept` over all tokens.

    A constant simulation gives slope 0 and intercept mean(true); no tokens raises ValueError.
    """
    t, s = _flatten(true, simulated)
    if t.size == 0:
        raise ValueError("Cannot fit a calibration on no tokens.")
    if _is_constant(s):
        return Calibration(0.0, float(np.mean(t)))
    design = np.stack([s, np.ones_like(s)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, t, rcond=None)
    return Calibration(float(slope), float(intercept))


