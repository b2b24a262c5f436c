"""Bad input gives a UserError with one clear line, and the command prints it without a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from neuronlens.cli import fail_cleanly, user_error
from neuronlens.corpus import CorpusError, FilesCorpus, token_windows
from neuronlens.errors import UserError
from neuronlens.subject.transformer import select_neurons
from neuronlens.records import NeuronId
from neuronlens.subject.hooks import check_neuron, hook_point, neuron_hooks
from neuronlens.models import SubjectError, load_model
from neuronlens.subject.recording import RecordingConfig, record


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert isinstance(err, UserError)
    assert msg and "\n" not in msg and msg.strip() == msg
    assert msg.endswith("."), msg
    return msg


def test_error_types_are_user_errors():
    assert issubclass(SubjectError, UserError) and issubclass(CorpusError, UserError)
    assert issubclass(UserError, ValueError)


def test_unsupported_architecture():
    """A state-space model (Mamba) has no MLP: one line naming it and what is supported."""
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                         state_size=4))
    with pytest.raises(SubjectError) as info:
        hook_point(model, 0)
    msg = _one_line(info.value)
    assert "'mamba'" in msg and "supported" in msg and "Llama" in msg and "GPT-2" in msg
    with pytest.raises(SubjectError):  # and before any hook is attached
        with neuron_hooks(model, [0], lambda _l, _a: None):
            pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_layer_out_of_range(request, arch):
    model = request.getfixturevalue(f"tiny_{arch}")  # 3 layers
    for layer in (3, 99, -1):
        with pytest.raises(SubjectError) as info:
            hook_point(model, layer)
        msg = _one_line(info.value)
        assert f"Layer {layer}" in msg and "3 layers" in msg and "0-2" in msg
    with pytest.raises(SubjectError, match="Layer 7 .*3 layers"):
        select_neurons(model, [0, 7], 2, "first", [], 0)
    with pytest.raises(SubjectError, match="Layer 5 "):
        record(model, None, [[1, 2, 3]], [NeuronId(5, 0)], RecordingConfig(), progress=False)


@pytest.mark.parametrize("arch,width", [("gpt2", 128), ("llama", 64)])
def test_neuron_index_out_of_range(request, arch, width):
    model = request.getfixturevalue(f"tiny_{arch}")
    check_neuron(model, width - 1)
    for index in (width, -1):
        with pytest.raises(SubjectError) as info:
            check_neuron(model, index)
        msg = _one_line(info.value)
        assert f"Neuron index {index}" in msg and f"{width} MLP neurons" in msg
    with pytest.raises(SubjectError, match=f"Neuron index {width + 5} "):
        select_neurons(model, [0], 1, "list", [1, width + 5], 0)
    with pytest.raises(SubjectError, match=f"Neuron index {width} "):
        record(model, None, [[1, 2, 3]], [NeuronId(0, width)], RecordingConfig(), progress=False)


def test_bad_neuron_selection(tiny_llama):
    with pytest.raises(UserError, match="neurons.which must be first, random or list"):
        select_neurons(tiny_llama, [0], 2, "best", [], 0)
    with pytest.raises(UserError, match="per_layer must be at least 1"):
        select_neurons(tiny_llama, [0], 0, "first", [], 0)
    with pytest.raises(UserError, match="needs neurons.indices"):
        select_neurons(tiny_llama, [0], 2, "list", [], 0)


def test_missing_model_directory():
    with pytest.raises(SubjectError) as info:
        load_model("/nonexistent/dir")
    msg = str(info.value)
    assert "\n" not in msg
    assert "/nonexistent/dir does not exist" in msg
    assert "existing directory" in msg and "HuggingFace model name" in msg  # says what would work


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_uncached_hub_name_without_a_hub_is_one_line_and_no_retries(tmp_path):
    """Offline, the hub client retried for 50 s before failing; the hub is now checked first."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}   # nothing listens there
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-m", "neuronlens", "subject.model=someone/some-model",
         f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
        cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "neuronlens: error: Model someone/some-model is not in the local Hugging Face cache and the "
        "hub cannot be reached; download it where there is a network (`hf download "
        "someone/some-model`), or give a local directory, a .gguf file, or one of: gemma3-270m, "
        "smollm2-135m-instruct."]
    assert "Retry" not in done.stdout + done.stderr


def test_a_cached_hub_name_loads_from_the_cache_without_a_hub(tiny_llama_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from neuronlens import models

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_llama_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    assert models.resolve("someone/tiny") == str(snapshot)
    model, _ = models.load_model("someone/tiny", device="cpu")
    assert model.config.num_hidden_layers == 3
    monkeypatch.setattr(models, "hub_reachable", lambda: True)   # with a hub: the name, as given
    assert models.resolve("someone/tiny") == "someone/tiny"


def test_missing_gguf_file(tmp_path):
    path = tmp_path / "nope" / "model.gguf"
    with pytest.raises(SubjectError) as info:
        load_model(str(path))
    msg = _one_line(info.value)
    assert str(path) in msg and "does not exist" in msg


def test_empty_corpus(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty.txt"
    path.write_text("   \n\n\t  \n")
    with pytest.raises(CorpusError) as info:
        list(token_windows(FilesCorpus([str(path)]), tiny_tokenizer, 8))
    msg = _one_line(info.value)
    assert "files" in msg and "8-token window" in msg


def test_corpus_too_short_for_one_window(tmp_path, tiny_tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("Hi.")
    with pytest.raises(CorpusError, match="no text long enough for one 64-token window"):
        list(token_windows(FilesCorpus([str(path)]), tiny_tokenizer, 64))


def test_window_too_small(tiny_tokenizer, tmp_path):
    (tmp_path / "x.txt").write_text("Some text.")
    with pytest.raises(CorpusError, match="at least 2 tokens, got 1"):
        list(token_windows(FilesCorpus([str(tmp_path / "x.txt")]), tiny_tokenizer, 1))


def test_a_missing_corpus_file_fails_when_the_corpus_is_made(tmp_path):
    path = tmp_path / "missing.txt"
    with pytest.raises(CorpusError) as info:
        FilesCorpus([str(path)])
    msg = _one_line(info.value)
    assert "does not exist" in msg and str(path) in msg


def test_a_corpus_file_that_cannot_be_read(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("text")
    corpus = FilesCorpus([str(path)])
    path.unlink()   # gone after the check: reading it is still one clear line
    with pytest.raises(CorpusError, match="Cannot read corpus file"):
        list(corpus.texts())


def test_not_utf8_corpus_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(CorpusError, match="Cannot read corpus file"):
        list(FilesCorpus([str(path)]).texts())


def test_jsonl_with_bad_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(CorpusError) as info:
        list(FilesCorpus([str(path)]).texts())
    msg = _one_line(info.value)
    assert str(path) in msg and "line 3" in msg and "not valid JSON" in msg


def test_jsonl_missing_the_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    corpus = FilesCorpus([str(path)], column="text")
    with pytest.raises(CorpusError) as info:
        list(corpus.texts())
    msg = _one_line(info.value)
    assert "line 2" in msg and "'text'" in msg and "corpus.column" in msg
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(CorpusError, match="line 1 has no 'text' field"):
        list(corpus.texts())


def test_unknown_file_type(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(CorpusError, match="neither .txt nor .jsonl"):
        FilesCorpus([str(path)])


def test_files_corpus_needs_paths():
    with pytest.raises(CorpusError) as info:
        FilesCorpus([])
    assert "corpus.paths" in _one_line(info.value)


def test_hydra_wrapped_user_error_fails_cleanly(capsys):
    node = OmegaConf.create({"_target_": "neuronlens.corpus.FilesCorpus", "paths": []})
    with pytest.raises(Exception) as info:
        instantiate(node)
    assert not isinstance(info.value, UserError)  # Hydra wraps it ...
    assert isinstance(user_error(info.value), CorpusError)  # ... and we find it underneath

    with pytest.raises(SystemExit) as exit_info:
        fail_cleanly(lambda: instantiate(node))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "neuronlens: error: corpus=files needs at least one path: corpus.paths=[a.txt,b.jsonl]."]

    with pytest.raises(ZeroDivisionError):  # other errors are not swallowed
        fail_cleanly(lambda: 1 / 0)


def test_cli_reports_a_bad_layer_without_traceback(tiny_llama_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "neuronlens", f"subject.model={tiny_llama_dir}",
         "subject.device=cpu", "neurons.layers=[99]", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("neuronlens: error:")
    assert "Layer 99" in last and "3 layers" in last
    assert "Traceback" not in done.stderr
