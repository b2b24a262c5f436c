"""Corpora and their cutting into token windows."""

from __future__ import annotations

import json
import os

import pytest

from neuronlens.corpus import BuiltinCorpus, Corpus, FilesCorpus, token_windows


class ListCorpus(Corpus):
    def __init__(self, texts: list[str]):
        self._texts = texts

    def texts(self):
        return iter(self._texts)

    def describe(self):
        return {"kind": "list"}


DOCS = ["The cat sat on the mat, and then it slept for 12 hours.",
        "   \n\t ",  # whitespace only: skipped, no empty document between EOS tokens
        "Stocks fell 3% on Tuesday as investors weighed the new tariffs.",
        "def add(a, b):\n    return a + b\n",
        "Rain is expected tomorrow."]


def _expected_stream(tokenizer, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        if d.strip():
            out += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    return out


@pytest.mark.parametrize("window", [2, 5, 16])
def test_windows_are_consecutive_slices_of_eos_joined_documents(tiny_tokenizer, window):
    stream = _expected_stream(tiny_tokenizer, DOCS)
    got = list(token_windows(ListCorpus(DOCS), tiny_tokenizer, window))
    assert all(len(w) == window for w in got)
    assert len(got) == len(stream) // window  # the trailing partial window is dropped
    assert got == [stream[i * window:(i + 1) * window] for i in range(len(got))]
    flat = [t for w in got for t in w]
    assert flat.count(tiny_tokenizer.eos_token_id) == stream[:len(flat)].count(
        tiny_tokenizer.eos_token_id)
    assert tiny_tokenizer.eos_token_id in flat


def test_max_windows(tiny_tokenizer):
    full = list(token_windows(ListCorpus(DOCS), tiny_tokenizer, 4))
    assert len(full) > 5
    assert list(token_windows(ListCorpus(DOCS), tiny_tokenizer, 4, max_windows=5)) == full[:5]
    assert list(token_windows(ListCorpus(DOCS), tiny_tokenizer, 4, max_windows=1000)) == full


def test_max_windows_stops_reading_the_corpus(tiny_tokenizer):
    read = []

    class Endless(Corpus):
        def texts(self):
            while True:
                read.append(1)
                yield "one two three four five six seven eight nine ten"

        def describe(self):
            return {"kind": "endless"}

    got = list(token_windows(Endless(), tiny_tokenizer, 8, max_windows=3))
    assert len(got) == 3 and len(read) <= 3


def test_files_corpus_reads_txt_and_jsonl(tmp_path, tiny_tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("First line of a text file.\nSecond line, same document.\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join([json.dumps({"body": "Row one \u00e9t\u00e9.", "text": "no"}),
                                "",
                                json.dumps({"body": 42}),
                                json.dumps({"body": "Row three."})]) + "\n", encoding="utf-8")
    corpus = FilesCorpus([str(txt), str(jsonl)], column="body")
    assert list(corpus.texts()) == [txt.read_text(encoding="utf-8"), "Row one été.", "42",
                                    "Row three."]
    assert list(FilesCorpus([str(jsonl), str(txt)], column="body", max_texts=2).texts()) == [
        "Row one été.", "42"]
    windows = list(token_windows(corpus, tiny_tokenizer, 4))
    assert windows and all(len(w) == 4 for w in windows)
    assert [t for w in windows for t in w] == _expected_stream(
        tiny_tokenizer, list(corpus.texts()))[:4 * len(windows)]


def test_files_corpus_default_column_and_markdown(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "hello"}) + "\n")
    md = tmp_path / "d.md"
    md.write_text("# Title\n\nBody.")
    assert list(FilesCorpus([str(jsonl), str(md)]).texts()) == ["hello", "# Title\n\nBody."]


def test_builtin_corpus(tiny_tokenizer):
    texts = list(BuiltinCorpus().texts())
    assert len(texts) >= 300
    assert len(set(texts)) == len(texts)
    assert all(t.strip() for t in texts)
    assert list(BuiltinCorpus(max_texts=7).texts()) == texts[:7]
    windows = list(token_windows(BuiltinCorpus(), tiny_tokenizer, 32, max_windows=50))
    assert len(windows) == 50
    assert all(len(w) == 32 and all(0 <= t < len(tiny_tokenizer) for t in w) for w in windows)
    assert windows[0] == _expected_stream(tiny_tokenizer, texts[:5])[:32]
    desc = BuiltinCorpus().describe()
    assert desc == BuiltinCorpus().describe() and desc["kind"] == "builtin"
    assert BuiltinCorpus(max_texts=7).describe() != desc


def test_describe_changes_when_a_file_changes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text")
    corpus = FilesCorpus([str(path)])
    first = corpus.describe()
    assert corpus.describe() == first  # stable while nothing changes
    assert FilesCorpus([str(path)], column="other").describe() != first

    path.write_text("some longer text")  # size changes
    second = corpus.describe()
    assert second != first

    st = path.stat()
    os.utime(path, (st.st_atime, st.st_mtime - 1000))  # same size, other mtime
    assert corpus.describe() != second


def test_max_windows_zero_is_a_clear_error(tiny_tokenizer):
    from neuronlens.corpus import CorpusError

    with pytest.raises(CorpusError, match="max_windows must be at least 1"):
        list(token_windows(ListCorpus(DOCS), tiny_tokenizer, 4, max_windows=0))
