"""Text corpora, and their cutting into fixed-length token windows (the excerpts).

Three sources: the built-in corpus that ships with the package, HuggingFace `datasets` (streamed),
and local .txt / .jsonl files. Documents are tokenised, joined with the tokenizer's end-of-text
token, and cut into consecutive windows of ``window`` tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from neuronlens.errors import UserError
from neuronlens.files import json_lines


class CorpusError(UserError):
    """A corpus problem the user can fix; the message is one clear sentence."""


class Corpus(ABC):
    @abstractmethod
    def texts(self) -> Iterator[str]: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Everything that identifies the corpus's content (part of the recording's cache key)."""


def _jsonl_texts(lines: Iterable[str], column: str, where: str) -> Iterator[str]:
    for n, row in json_lines(lines, where, CorpusError):
        if not isinstance(row, dict) or column not in row:
            raise CorpusError(f"{where} line {n} has no {column!r} field; set corpus.column.")
        yield str(row[column])


class BuiltinCorpus(Corpus):
    """A few hundred varied English passages written for neuronlens (reviews, news, code, ...)."""

    def __init__(self, max_texts: int | None = None):
        self.max_texts = max_texts

    def texts(self) -> Iterator[str]:
        source = resources.files("neuronlens") / "data" / "builtin_corpus.jsonl"
        lines = source.read_text(encoding="utf-8").splitlines()
        return islice(_jsonl_texts(lines, "text", "The built-in corpus"), self.max_texts)

    def describe(self) -> dict[str, Any]:
        source = resources.files("neuronlens") / "data" / "builtin_corpus.jsonl"
        import hashlib
        return {"kind": "builtin", "max_texts": self.max_texts,
                "sha256": hashlib.sha256(source.read_bytes()).hexdigest()[:16]}


TEXT_SUFFIXES = (".txt", ".md", ".raw", "")


class FilesCorpus(Corpus):
    """Local files: a .txt file is one document; a .jsonl file holds one document per line."""

    def __init__(self, paths: Sequence[str], column: str = "text", max_texts: int | None = None):
        if not paths:
            raise CorpusError("corpus=files needs at least one path: corpus.paths=[a.txt,b.jsonl].")
        self.paths = [Path(p).expanduser() for p in paths]
        for path in self.paths:   # checked now, before any model loads
            if not path.is_file():
                raise CorpusError(f"Corpus file {path} does not exist; corpus.paths takes .txt and "
                                  ".jsonl files.")
            if path.suffix not in (".jsonl", *TEXT_SUFFIXES):
                raise CorpusError(f"Corpus file {path} is neither .txt nor .jsonl; give .txt files "
                                  "(one document each) or .jsonl files (one per line).")
        self.column = column
        self.max_texts = max_texts

    def _read(self, path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CorpusError(f"Cannot read corpus file {path}: {e}.") from e

    def _all(self) -> Iterator[str]:
        for path in self.paths:
            if path.suffix == ".jsonl":
                yield from _jsonl_texts(self._read(path).splitlines(), self.column, str(path))
            elif path.suffix in TEXT_SUFFIXES:
                yield self._read(path)
            else:
                raise CorpusError(f"Corpus file {path} is neither .txt nor .jsonl.")

    def texts(self) -> Iterator[str]:
        return islice(self._all(), self.max_texts)

    def describe(self) -> dict[str, Any]:
        stats = []
        for p in self.paths:
            st = p.stat() if p.exists() else None
            stats.append([str(p.resolve()), st.st_size if st else None,
                          int(st.st_mtime) if st else None])
        return {"kind": "files", "files": stats, "column": self.column, "max_texts": self.max_texts}


class HFCorpus(Corpus):
    """A HuggingFace dataset, streamed so that only what is used is read."""

    def __init__(self, name: str, config: str | None = None, split: str = "train",
                 column: str = "text", streaming: bool = True, max_texts: int | None = 2000):
        self.name, self.config, self.split, self.column = name, config, split, column
        self.streaming, self.max_texts = streaming, max_texts

    def texts(self) -> Iterator[str]:
        import datasets

        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split,
                                       streaming=self.streaming)
        except Exception as e:  # datasets raises many types; all mean the same to the user
            raise CorpusError(f"Could not load HF dataset {self.name!r} (config {self.config!r}, "
                              f"split {self.split!r}): {str(e).splitlines()[0]}") from e
        for n, row in enumerate(islice(ds, self.max_texts)):
            if self.column not in row:
                raise CorpusError(f"HF dataset {self.name!r} has no column {self.column!r} "
                                  f"(it has {', '.join(row)}); set corpus.column.")
            yield str(row[self.column])

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "name": self.name, "config": self.config, "split": self.split,
                "column": self.column, "max_texts": self.max_texts}


def token_windows(corpus: Corpus, tokenizer, window: int = 64,
                  max_windows: int | None = None) -> Iterator[list[int]]:
    """Consecutive ``window``-token windows over the corpus's documents joined with EOS."""
    if window < 2:
        raise CorpusError(f"corpus window must be at least 2 tokens, got {window}.")
    if max_windows is not None and max_windows < 1:
        raise CorpusError(f"max_windows must be at least 1 (or null for all), got {max_windows}.")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    buffer: list[int] = []
    produced = 0
    for text in corpus.texts():
        if not text.strip():
            continue
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
        while len(buffer) >= window:
            yield buffer[:window]
            buffer = buffer[window:]
            produced += 1
            if max_windows is not None and produced >= max_windows:
                return
    if produced == 0:
        raise CorpusError(f"The corpus {corpus.describe().get('kind')} gave no text long enough for "
                          f"one {window}-token window; check its paths/columns or lower "
                          "corpus.window.")
