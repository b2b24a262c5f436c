"""The probes: an L1-regularised logistic regression over all neurons, and the best single neuron
with a threshold; plus the data-efficiency curve of both.

Activations are standardised (fitted on train) so that weights compare across neurons; L1 makes most
of them exactly zero, which is what ranks neurons. The regularisation strength C is chosen on the
validation split, the single neuron's threshold on train.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import sklearn
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from neuronlens.errors import UserError

log = logging.getLogger(__name__)
CHUNK = 2048  # columns at a time in the single-neuron search: memory stays ~n x CHUNK


def _l1() -> dict:
    """scikit-learn >= 1.8 spells L1 as l1_ratio=1 (penalty= is deprecated); older ones need it."""
    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


@dataclass
class L1Probe:
    scaler: StandardScaler
    clf: LogisticRegression
    C: float
    valid_accuracy: float

    def proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of the concept for each row of activations."""
        return self.clf.predict_proba(self.scaler.transform(X))[:, 1]

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean((self.proba(X) > 0.5) == y))

    @property
    def weights(self) -> np.ndarray:
        """Weight per neuron, on standardised activations (comparable across neurons)."""
        return self.clf.coef_[0]

    def top(self, k: int) -> list[int]:
        """Columns of the k largest |weight|, non-zero only."""
        w = np.abs(self.weights)
        return [int(j) for j in np.argsort(-w, kind="stable")[:k] if w[j] > 0]


def fit_l1(Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray,
           Cs: Sequence[float], seed: int = 0) -> L1Probe:
    """The L1 logistic regression whose C is best on valid (ties: the smaller C, sparser)."""
    if not Cs:
        raise UserError("probe.Cs is empty; give at least one regularisation strength.")
    scaler = StandardScaler().fit(Xtr)
    # float64 once, here: liblinear would otherwise copy the matrix again for every C
    Ztr, Zva = scaler.transform(Xtr).astype(np.float64), scaler.transform(Xva)
    best = None
    for C in sorted(float(c) for c in Cs):
        clf = LogisticRegression(C=C, solver="liblinear", random_state=seed, max_iter=200, **_l1())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # near-optimal is fine for ranking
            clf.fit(Ztr, ytr)
        acc = float(np.mean(clf.predict(Zva) == yva))
        if best is None or acc > best.valid_accuracy:
            best = L1Probe(scaler, clf, C, acc)
    return best


@dataclass(frozen=True)
class Threshold:
    """One neuron as a classifier: concept when the activation is above (sign=+1) or below
    (sign=-1) the threshold."""

    column: int
    threshold: float
    sign: int
    train_accuracy: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        x = X[:, self.column]
        return (x > self.threshold) if self.sign > 0 else (x < self.threshold)

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(X) == y))


def _thresholds(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every column at once: the best train accuracy of one threshold, its value and sign.

    A cut between sorted values k-1 and k calls the top n-k texts concept; cutting between equal
    values is not possible, so those cuts are skipped.
    """
    n = len(y)
    order = np.argsort(X, axis=0, kind="stable")
    xs = np.take_along_axis(X, order, axis=0)
    pos_below = np.vstack([np.zeros((1, X.shape[1])), np.cumsum(y[order], axis=0)])
    k = np.arange(n + 1)[:, None]
    acc_up = (k - pos_below + (y.sum() - pos_below)) / n  # negatives below + positives above
    acc = np.maximum(acc_up, 1 - acc_up)
    if n > 1:
        acc[1:n][xs[1:] == xs[:-1]] = -1.0
    best = acc.argmax(axis=0)
    cols = np.arange(X.shape[1])
    padded = np.vstack([xs[:1] - 1, xs, xs[-1:] + 1])  # k=0: below everything; k=n: above
    thr = (padded[best, cols] + padded[best + 1, cols]) / 2
    sign = np.where(acc_up[best, cols] >= 1 - acc_up[best, cols], 1, -1)
    return acc[best, cols], thr, sign


def thresholds(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_thresholds` in column chunks, so memory does not grow with the number of neurons."""
    parts = [_thresholds(X[:, j:j + CHUNK], y) for j in range(0, X.shape[1], CHUNK)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def _separation(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|difference of class means| / pooled std per column: a tie-breaker with no extra labels."""
    diff = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    return diff / (X.std(0) + 1e-12)


def best_single(Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray | None = None,
                yva: np.ndarray | None = None) -> Threshold:
    """The neuron that classifies best alone, thresholds fitted on train. Chosen by its validation
    accuracy when a validation split is given, else by train accuracy; ties by class separation."""
    acc, thr, sign = thresholds(Xtr, ytr)
    if Xva is not None:
        pred = np.where(sign > 0, Xva > thr, Xva < thr)
        rank = np.mean(pred == yva[:, None], axis=0)
        key = np.lexsort((_separation(Xtr, ytr), acc, rank))
    else:
        key = np.lexsort((_separation(Xtr, ytr), acc))
    j = int(key[-1])
    return Threshold(j, float(thr[j]), int(sign[j]), float(acc[j]))


def curve_sizes(n_train: int, sizes: Sequence[int] | None) -> list[int]:
    """8, 16, 32, ... below n_train, then n_train itself (or the sizes asked for, capped)."""
    if sizes:
        return sorted({min(int(s), n_train) for s in sizes if int(s) >= 2})
    out, s = [], 8
    while s < n_train:
        out.append(s)
        s *= 2
    return out + [n_train]


def fit_l1_within(X: np.ndarray, y: np.ndarray, Cs: Sequence[float], seed: int = 0) -> L1Probe:
    """The probe someone with only these labelled texts would fit: C chosen on a stratified third
    of them (fitted on the rest), then refitted on all of them with that C. With fewer than 2
    texts of a class there is nothing to hold out: the strongest regularisation is taken."""
    try:
        Xa, Xb, ya, yb = train_test_split(X, y, test_size=1 / 3, stratify=y, random_state=seed)
        C = fit_l1(Xa, ya, Xb, yb, Cs, seed).C
    except ValueError:
        C = min(float(c) for c in Cs)
    return fit_l1(X, y, X, y, [C], seed)


def data_efficiency(Xtr, ytr, Xte, yte, Cs: Sequence[float], sizes: Sequence[int],
                    seeds: int, seed: int = 0) -> list[dict]:
    """Test accuracy against the number of labelled training texts, several random draws each:
    the L1 probe and the single neuron, each chosen, regularised and thresholded on the n texts
    alone (no other label is used, so the x-axis counts every label). One draw at the full size,
    where every draw would be the same."""
    rows = []
    for n in sizes:
        full = n >= len(ytr) - 1  # a stratified draw must leave out at least one text per class
        for s in range(1 if full else seeds):
            if full:
                X, y = Xtr, ytr
            else:
                X, _, y, _ = train_test_split(Xtr, ytr, train_size=n, stratify=ytr,
                                              random_state=seed + s)
            l1 = fit_l1_within(X, y, Cs, seed)
            single = best_single(X, y)
            rows.append({"n": int(n), "seed": s, "l1": l1.accuracy(Xte, yte), "C": l1.C,
                         "n_nonzero": int(np.count_nonzero(l1.weights)),
                         "single": single.accuracy(Xte, yte), "single_column": single.column})
            log.info("data efficiency: n=%d draw %d: L1 %.3f, single neuron %.3f",
                     n, s, rows[-1]["l1"], rows[-1]["single"])
    return rows
