"""The labelled dataset of a concept: texts with one of two labels, in train / valid / test splits.

Read from local files (.tsv / .csv with a header line, or .jsonl) or a HuggingFace dataset, and
checked once, here, so that a missing column, a single class or an empty split is one clear error
before any model runs.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from neuronlens.errors import UserError
from neuronlens.files import json_lines


class DataError(UserError):
    """A labelled-dataset problem the user can fix; the message is one clear sentence."""


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: np.ndarray  # 0/1 ints; 1 is the concept

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows) -> Split:
        rows = list(rows)
        return Split([self.texts[i] for i in rows], self.labels[rows])


@dataclass(frozen=True)
class Dataset:
    train: Split
    valid: Split
    test: Split
    classes: tuple[str, str]  # the two label values as read; classes[1] is the concept
    notes: tuple[str, ...]    # what was done to the data (held-out validation, subsampling, ...)

    def describe(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "notes": list(self.notes),
                **{name: {"n": len(s), "n_concept": int(s.labels.sum())}
                   for name, s in (("train", self.train), ("valid", self.valid),
                                   ("test", self.test))}}


Rows = list[tuple[str, str]]  # (text, label as a string)


def _table_rows(path: Path, text: str, label: str) -> Iterator[dict[str, Any]]:
    """Rows of a .tsv/.csv (header line) or .jsonl file as dicts."""
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if suffix == ".jsonl":
                yield from (row for _, row in json_lines(f, str(path), DataError))
            elif suffix in (".tsv", ".csv"):
                # GLUE's TSV files hold bare quote characters inside sentences: no quoting for TSV
                quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
                yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",",
                                          quoting=quoting)
            else:
                raise DataError(f"Dataset file {path} is not .tsv, .csv or .jsonl; convert it to "
                                "one of those.")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read dataset file {path}: {e}.") from e


def _pairs(rows, text: str, label: str, where: str) -> Rows:
    """(text, label) pairs, checking the columns on the first row."""
    out: Rows = []
    for row in rows:
        if not out:
            missing = [c for c in (text, label) if c not in row]
            if missing:
                raise DataError(
                    f"{where} has no column {' or '.join(map(repr, missing))} (it has "
                    f"{', '.join(map(repr, row))}); set probe.text and probe.label.")
        out.append((str(row[text] or ""), str(row[label])))
    if not out:
        raise DataError(f"{where} holds no rows; give a dataset with labelled texts.")
    return out


def read_file(path: str, text: str, label: str) -> Rows:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"Dataset file {path} does not exist; check probe.train/valid/test.")
    return _pairs(_table_rows(p, text, label), text, label, str(p))


def read_hf(name: str, config: str | None, split: str, text: str, label: str) -> Rows:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types; all mean the same to the user
        raise DataError(f"Could not load HF dataset {name!r} (config {config!r}, split {split!r}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return _pairs(iter(ds), text, label, f"HF dataset {name!r} split {split!r}")


def _classes(train: Rows, positive: str | None) -> tuple[str, str]:
    values = sorted({lab for _, lab in train}, key=lambda v: (len(v), v))  # "2" < "10"
    if len(values) < 2:
        raise DataError(f"The training split has a single label value ({values[0]!r}); a concept "
                        "needs texts with and without it, so give both labels.")
    if len(values) > 2:
        raise DataError(f"The training split has {len(values)} label values ({', '.join(values[:6])}"
                        f"{', ...' if len(values) > 6 else ''}); the probe needs exactly two, so map "
                        "the labels to concept / not-concept first.")
    if positive is None:
        return values[0], values[1]
    positive = str(positive)
    if positive not in values:
        raise DataError(f"probe.positive={positive!r} is not a label of the training split "
                        f"({values[0]!r}, {values[1]!r}).")
    return next(v for v in values if v != positive), positive


def _split(rows: Rows, classes: tuple[str, str], name: str) -> tuple[Split, int]:
    """The rows as a Split; blank texts are dropped and counted."""
    kept = [(t, lab) for t, lab in rows if t.strip()]
    other = sorted({lab for _, lab in kept} - set(classes))
    if other:
        raise DataError(f"The {name} split has label values {other} that the training split does "
                        f"not have ({classes[0]!r}, {classes[1]!r}); give a labelled {name} split.")
    if not kept:
        raise DataError(f"The {name} split holds no non-blank text; give a dataset with texts.")
    return (Split([t for t, _ in kept], np.array([int(lab == classes[1]) for _, lab in kept])),
            len(rows) - len(kept))


def _subsample(split: Split, n: int | None, rng: np.random.Generator) -> Split:
    if n is None or n >= len(split):
        return split
    if n < 2:
        raise DataError(f"A split cannot be cut to {n} texts; give probe.max_* of at least 2.")
    return split.take(sorted(rng.choice(len(split), n, replace=False)))


def build(train: Rows, valid: Rows | None, test: Rows | None, positive: str | None = None,
          valid_fraction: float = 0.2, max_train: int | None = None, max_valid: int | None = None,
          max_test: int | None = None, seed: int = 0) -> Dataset:
    """Checked splits. Without ``valid``, a random ``valid_fraction`` of train is held out; without
    ``test``, the validation split is also the test split."""
    classes = _classes(train, positive)
    notes = []
    rng = np.random.default_rng(seed)
    tr, dropped = _split(train, classes, "train")
    if valid is None:
        if not 0 < valid_fraction < 1:
            raise DataError(f"probe.valid_fraction must be between 0 and 1, got {valid_fraction}.")
        order = rng.permutation(len(tr))
        cut = max(1, int(round(valid_fraction * len(tr))))
        tr, va = tr.take(sorted(order[cut:])), tr.take(sorted(order[:cut]))
        notes.append(f"validation: {valid_fraction:g} of the training file, held out")
    else:
        va, d = _split(valid, classes, "valid")
        dropped += d
    if test is None:
        notes.append("test: the validation split (no separate test split given)")
    te, d = _split(test, classes, "test") if test is not None else (None, 0)
    dropped += d
    sizes = {"train": len(tr), "valid": len(va)}
    tr, va = _subsample(tr, max_train, rng), _subsample(va, max_valid, rng)
    te = va if te is None else _subsample(te, max_test, rng)
    for name, split, before in (("train", tr, sizes["train"]), ("valid", va, sizes["valid"])):
        if len(split) < before:
            notes.append(f"{name}: a random {len(split)} of {before} texts")
    if dropped:
        notes.append(f"{dropped} blank texts dropped")
    if len(set(tr.labels.tolist())) < 2:
        if len(tr) < sizes["train"]:
            raise DataError(f"After subsampling ({len(tr)} of {sizes['train']} texts), the training "
                            "split has a single class; raise probe.max_train.")
        raise DataError("The training split has a single class; a probe needs texts of at least "
                        "two classes (check the label column and probe.positive).")
    return Dataset(tr, va, te, classes, tuple(notes))


def load(p, seed: int = 0) -> Dataset:
    """The dataset that the ``probe`` config block describes."""
    if p.data == "files":
        if not p.train:
            raise DataError("probe.data=files needs probe.train=<path to a .tsv/.csv/.jsonl file>.")
        read = lambda path: read_file(path, p.text, p.label)  # noqa: E731
        train = read(p.train)
    elif p.data == "hf":
        if not p.name:
            raise DataError("probe.data=hf needs probe.name=<HF dataset>, e.g. stanfordnlp/sst2.")
        read = lambda split: read_hf(p.name, p.config, split, p.text, p.label)  # noqa: E731
        train = read(p.train or "train")
    else:
        raise DataError(f"probe.data must be files or hf, not {p.data!r}.")
    return build(train, read(p.valid) if p.valid else None, read(p.test) if p.test else None,
                 p.positive, p.valid_fraction, p.max_train, p.max_valid, p.max_test, seed)
