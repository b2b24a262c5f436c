"""Nothing lost, nothing leaked: a rerun redoes what failed for a transient cause, the response
cache never replays an unusable answer, torn files are redone, keys never echo, bad input is one
line before anything loads, one writer per run directory, and the server announces itself only
once it listens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from hydra import compose, initialize_config_dir

import neuronlens.pipeline as pipeline
from neuronlens.conf import CONF_DIR
from neuronlens.errors import UserError
from neuronlens.files import RunLock, dumps, read_rows
from neuronlens.serve import start_server

CANARY = "sk-canary-0123456789abcdefghijklmnop"


pytestmark = pytest.mark.usefixtures("instant_backoff")


@pytest.fixture(scope="module")
def corpus(corpus40) -> Path:
    return corpus40


def overrides(model_dir: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    return [f"subject.model={model_dir}", "subject.device=cpu", "corpus=files",
            f"corpus.paths=[{corpus}]", "neurons.layers=[1]", "neurons.per_layer=3",
            "recording.top_k=10", "recording.n_random=10", "recording.window=12",
            "explain.max_tokens=6", "simulation.fewshot=false", "progress=false", "judges=null",
            "judge_power.enabled=false",
            f"remote.cache_dir={cache}", f"explainer.model={model_dir}",
            f"simulator.model={model_dir}", *extra]


def compose_cfg(items: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=items)


def on_server(url: str, model: str, model_dir: Path) -> list[str]:
    """Both roles on the server; k = the vocabulary's size (the test servers lift vLLM's 20)."""
    from transformers import AutoConfig

    k = AutoConfig.from_pretrained(model_dir).vocab_size
    return ["explainer=openai", f"explainer.model={model}", f"explainer.base_url={url}",
            "explainer.completion=true", "simulator=vllm", f"simulator.model={model}",
            f"simulator.base_url={url}", f"simulator.top_logprobs={k}",
            "simulator.scoring=prompt_logprobs"]   # neuronlens-serve takes text prompts, not token ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- 1, 2: resume redoes transient failures; the cache never replays an unusable answer ------
def test_a_rerun_redoes_transient_failures_and_keeps_the_rest(tiny_llama_dir, corpus, tmp_path, caplog):
    port = free_port()
    base = overrides(tiny_llama_dir, corpus, tmp_path / "cache", "remote.max_retries=0")
    with start_server(str(tiny_llama_dir), port, device="cpu", max_logprobs=None,
                      faults=["none", "500", "none", "none"]) as server:
        cfg = compose_cfg(base + on_server(server.base_url, server.model, tiny_llama_dir))
        first = pipeline.run(cfg, tmp_path / "run")
    before = {(r["layer"], r["index"]): r for r in read_rows(tmp_path / "run" / "neurons.jsonl")}
    redo = {k for k, r in before.items() if pipeline.redo_kinds(r)}
    assert redo and first["failures_by_kind"].get("server_error"), first["failures_by_kind"]
    assert all(pipeline.redo_kinds(before[k]) == {"server_error"} for k in redo)

    with start_server(str(tiny_llama_dir), port, device="cpu", max_logprobs=None) as server:
        with caplog.at_level("INFO"):
            second = pipeline.run(cfg, tmp_path / "run")
    assert f"Redoing {len(redo)} neurons that failed for a transient cause (server_error" in caplog.text
    after = {(r["layer"], r["index"]): r for r in read_rows(tmp_path / "run" / "neurons.jsonl")}
    assert len(after) == 3 == second["n_neurons"] and second["failures_by_kind"] == {}
    assert sum(1 for _ in (tmp_path / "run" / "neurons.jsonl").open()) == 3   # no duplicate rows
    for key, row in before.items():
        if key not in redo:
            assert after[key] == row   # kept as it was, not redone


def test_an_empty_explanation_is_never_replayed_from_the_cache(tiny_llama_dir, corpus, tmp_path):
    """`wrong_length` cuts the answer's last line: a one-line explanation comes back empty."""
    port = free_port()
    base = overrides(tiny_llama_dir, corpus, tmp_path / "cache")
    with start_server(str(tiny_llama_dir), port, device="cpu", max_logprobs=None,
                      faults=["wrong_length"]) as server:
        cfg = compose_cfg(base + on_server(server.base_url, server.model, tiny_llama_dir))
        first = pipeline.run(cfg, tmp_path / "run")
    assert first["n_failed"] == 3 and first["failures_by_kind"]["no_explanation"] == 3
    with start_server(str(tiny_llama_dir), port, device="cpu", max_logprobs=None) as server:
        second = pipeline.run(cfg, tmp_path / "run")
    assert second["n_failed"] == 0
    assert second["remote"]["explainer"]["cache_hits"] == 0   # asked again, not replayed


# ---- 3: atomic writes; a torn recording is redone ----------------------------------------------
def test_a_torn_recording_is_recorded_again_with_one_warning(tiny_llama_dir, corpus, tmp_path, caplog):
    cfg = compose_cfg(overrides(tiny_llama_dir, corpus, tmp_path / "cache", "recording.cache=false"))
    pipeline.run(cfg, tmp_path / "run")
    manifest = tmp_path / "run" / "recording" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])   # cut off mid-write
    (tmp_path / "run" / "neurons.jsonl").unlink()
    with caplog.at_level("WARNING"):
        summary = pipeline.run(cfg, tmp_path / "run")
    assert "is incomplete or damaged (JSONDecodeError); recording again" in caplog.text
    assert summary["n_neurons"] == 3
    json.loads(manifest.read_text())


FULL_DISK = """
import resource, signal, sys
from hydra import compose, initialize_config_dir
from neuronlens.conf import CONF_DIR
from neuronlens.cli import fail_cleanly
import neuronlens.pipeline as pipeline
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # EFBIG instead of a kill, as ENOSPC would be
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
    cfg = compose(config_name="config", overrides=sys.argv[3:])
fail_cleanly(lambda: pipeline.run(cfg, __import__("pathlib").Path(sys.argv[2])))
"""


def test_a_full_disk_is_one_line_and_the_rerun_finishes(tiny_llama_dir, corpus, tmp_path):
    items = overrides(tiny_llama_dir, corpus, tmp_path / "cache", "recording.cache=false")
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, "4000", str(run_dir), *items],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("neuronlens: error: Could not write ")
    assert "the file is too large" in done.stderr and "Traceback" not in done.stderr
    summary = pipeline.run(compose_cfg(items), run_dir)   # room again: the same command finishes
    assert summary["n_neurons"] == 3 and len(read_rows(run_dir / "neurons.jsonl")) == 3


def test_rows_are_strict_json_and_a_row_without_its_neuron_is_one_line(tmp_path):
    assert dumps({"a": float("nan"), "b": [float("inf"), 1.5]}) == '{"a": null, "b": [null, 1.5]}'
    path = tmp_path / "neurons.jsonl"
    path.write_text('{"layer": 1, "index": 2}\n{"index": 3, "score": 0.1}\n')
    with pytest.raises(UserError, match=r"line 2 is not a neuron's row .*remove that line"):
        pipeline.finished(path)
    from neuronlens.report.runs import rows_of_run

    with pytest.raises(UserError, match="line 2 is not a neuron's row"):
        rows_of_run(tmp_path)


# ---- 4: keys never echo ------------------------------------------------------------------------
class Echo(BaseHTTPRequestHandler):
    """Answers every request with the next status of a cycle, its body echoing the request's
    headers (as a careless proxy does), in JSON or HTML."""

    cycle = [(401, "json"), (403, "html"), (500, "json"), (401, "html")]
    n = 0

    def _answer(self) -> None:
        status, kind = Echo.cycle[Echo.n % len(Echo.cycle)]
        Echo.n += 1
        headers = dict(self.headers)
        if kind == "json":
            body = json.dumps({"error": {"message": f"bad request, headers were {headers}"}})
            ctype = "application/json"
        else:
            body = f"<html><body><h1>{status}</h1><pre>{headers}</pre></body></html>"
            ctype = "text/html"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def echo_server():
    Echo.n = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.parametrize("role", ["openai", "vllm", "litellm"])
def test_a_server_echoing_the_key_never_makes_neuronlens_print_it(role, echo_server, tiny_llama_dir,
                                                                 corpus, tmp_path):
    key_env = {"openai": "OPENAI_API_KEY", "vllm": "VLLM_API_KEY", "litellm": "OPENAI_API_KEY"}[role]
    model = "openai/m" if role == "litellm" else "m"
    run_dir = tmp_path / "run"
    args = [f"subject.model={tiny_llama_dir}", "subject.device=cpu", "neurons.layers=[1]",
            "neurons.per_layer=2", "recording.top_k=6", "recording.n_random=4", "recording.window=8",
            "recording.max_windows=40", "progress=false", "judges=null", "remote.max_retries=3",
            "judge_power.enabled=false",
            f"remote.cache_dir={tmp_path / 'cache'}", f"simulator.model={tiny_llama_dir}",
            f"explainer={role}", f"explainer.model={model}", f"explainer.base_url={echo_server}",
            f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")} | {key_env: CANARY}
    done = subprocess.run([sys.executable, "-m", "neuronlens", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode != 0, done.stdout[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("neuronlens: error:"), done.stderr[-3000:]
    if role in ("openai", "vllm"):
        assert key_env in last   # the variable the key is read from, named for this backend
    everything = done.stdout + done.stderr + "".join(
        p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())
    assert CANARY not in everything and CANARY[:20] not in everything
    assert "[redacted]" in everything or role == "vllm"   # vllm's check names no body at all
    assert "HTTP Request:" not in everything   # httpx/httpx2's line per request stays out of the log


def test_redact_removes_env_keys_and_bearer_tokens(monkeypatch):
    from neuronlens.secrets import redact

    monkeypatch.setenv("SOME_PROVIDER_API_KEY", "plain-secret-value-42")
    text = redact("key plain-secret-value-42, header 'Authorization: Bearer abc.def-ghi', sk-" + "x" * 30)
    assert "plain-secret" not in text and "abc.def" not in text and "x" * 30 not in text
    assert text.count("[redacted]") == 3 and "Bearer [redacted]" in text
    assert redact("a basic keyboard_shortcut_for_the_win") == "a basic keyboard_shortcut_for_the_win"


def test_a_key_redacted_from_the_environment_keeps_its_brackets_balanced(monkeypatch):
    """A server's 401 echoing the Authorization header with the environment's key: the key goes
    first (environment values), then the bearer shape must not take the redaction for a token
    and redact it again (``Bearer [redacted]]``)."""
    from neuronlens.secrets import redact

    key = "sk-" + "k" * 40
    monkeypatch.setenv("OPENAI_API_KEY", key)
    for body in (f"401 Unauthorized: invalid header Authorization: Bearer {key}",
                 f'{{"error": "bad token Bearer {key}"}}', f"(Bearer {key})"):
        text = redact(body)
        assert text == body.replace(key, "[redacted]") and text.count("[") == text.count("]")
        assert redact(text) == text   # redacting twice changes nothing


# ---- 6, 7: a server that never answers stops the run, non-zero ---------------------------------
def test_a_closed_port_stops_the_run_with_one_line(tiny_llama_dir, corpus, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    args = overrides(tiny_llama_dir, corpus, tmp_path / "cache", "remote.max_retries=2",
                     "explainer=openai", "explainer.model=m", f"explainer.base_url={url}")
    done = subprocess.run([sys.executable, "-m", "neuronlens", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "has stopped answering" in last and "could not be reached" in last
    assert "Traceback" not in done.stderr


# ---- 8: bad input is one line, before anything loads, and blocks nothing -----------------------
@pytest.mark.parametrize("bad, says", [
    ("seed=abc", "seed must be a whole number (got 'abc')"),
    ("neurons.layers=abc", "neurons.layers must be a list of whole numbers"),
    ("recording.batch_size=0", "recording.batch_size must be a whole number of at least 1"),
    ("remote.max_retries=-1", "remote.max_retries must be a whole number of at least 0"),
    ("explain.n=0", "explain.n must be a whole number of at least 1"),
    ("recording.top_k=0", "recording.top_k must be a whole number of at least 1"),
    ("concurrency=0", "concurrency must be a whole number of at least 1"),
    ("neurons.which=some", "neurons.which must be one of first, random, list"),
])
def test_bad_settings_are_one_line_before_anything_loads(bad, says, tmp_path):
    from neuronlens.cli.checks import compose

    with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")):
        # a load would fail otherwise; a wrong type fails as Hydra composes, a range in pipeline.run
        pipeline.run(compose("config", ["subject.model=/no/such/model", bad]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_failed_start_does_not_block_the_corrected_command(tiny_llama_dir, corpus, tmp_path):
    items = overrides(tiny_llama_dir, corpus, tmp_path / "cache")
    with pytest.raises(UserError):
        pipeline.run(compose_cfg([*items, "neurons.layers=[99]"]), tmp_path / "run")
    assert pipeline.run(compose_cfg(items), tmp_path / "run")["n_neurons"] == 3


def test_a_text_file_named_gguf_is_one_line(tmp_path):
    from neuronlens.models import resolve

    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    with pytest.raises(UserError, match="is not a GGUF file"):
        resolve(str(fake))


def test_an_unwritable_output_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-m", "neuronlens", f"hydra.run.dir={blocker / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"neuronlens: error: cannot write the output folder {blocker / 'run'} ({blocker} is not a "
        "writable folder); choose one with hydra.run.dir=..."]


# ---- 9: one writer per run directory -----------------------------------------------------------
def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tiny_llama_dir, corpus, tmp_path):
    cfg = compose_cfg(overrides(tiny_llama_dir, corpus, tmp_path / "cache"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):
        with pytest.raises(UserError, match=f"Another neuronlens process \\(pid {os.getpid()}\\) is writing"):
            pipeline.run(cfg, run_dir)
    # a lock file left by a process killed with -9: its pid is dead and the kernel dropped its lock
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from neuronlens.files import "
                              "RunLock; l = RunLock(sys.argv[1]).__enter__(); print('locked', "
                              "flush=True); time.sleep(60)", str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"pid {child.pid}"):
        pipeline.run(cfg, run_dir)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert (run_dir / ".lock").read_text() == str(child.pid)
    assert pipeline.run(cfg, run_dir)["n_neurons"] == 3


# ---- 10: neuronlens-serve listens first, then announces ----------------------------------------
def test_serve_on_a_taken_port_fails_in_one_line_without_announcing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "neuronlens.serve", f"port={port}",
                               f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert "at http://" not in done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith(f"neuronlens: error: Cannot listen on "
                                                           f"127.0.0.1:{port}")


def test_serve_beyond_loopback_without_a_key_is_refused_before_the_model_loads(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NEURONLENS_SERVE_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "neuronlens.serve", "host=0.0.0.0", "port=0",
                           "model=/nonexistent/model"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert done.returncode == 2 and "at http://" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("neuronlens: error: neuronlens-serve will not listen on 0.0.0.0 without "
                           "an API key: set NEURONLENS_SERVE_API_KEY"), done.stderr[-2000:]
    assert "nonexistent" not in done.stderr   # refused before the model was looked for


def test_a_served_key_is_required_compared_whole_and_never_echoed(tiny_llama_dir, corpus, tmp_path):
    """A server started with the canary key: requests without it, with a wrong one or with a
    prefix of it get a 401 that echoes nothing sent; a neuronlens run whose simulator sends it
    through the vllm backend (VLLM_API_KEY) scores, and the key is in none of the run's output or files."""
    from neuronlens.serve.app import authorised

    assert authorised(f"Bearer {CANARY}", CANARY) and not authorised(f"Bearer {CANARY[:-1]}", CANARY)
    assert not authorised(CANARY, CANARY) and not authorised("", CANARY)
    with start_server(str(tiny_llama_dir), device="cpu", api_key=CANARY) as server:
        wrong = "sk-wrong-guess-" + "z" * 20
        for headers in ({}, {"Authorization": f"Bearer {wrong}"},
                        {"Authorization": f"Bearer {CANARY[:20]}"}, {"Authorization": CANARY}):
            answer = httpx.post(f"{server.base_url}/completions", headers=headers, timeout=30,
                                json={"model": server.model, "prompt": "a", "max_tokens": 1})
            assert answer.status_code == 401, headers
            assert answer.json()["error"]["code"] == "invalid_api_key"
            assert wrong not in answer.text and CANARY[:20] not in answer.text
        assert httpx.get(f"{server.base_url}/models", timeout=30).status_code == 401
        run_dir = tmp_path / "run"
        args = [f"subject.model={tiny_llama_dir}", "subject.device=cpu", "neurons.layers=[1]",
                "neurons.per_layer=1", "recording.top_k=6", "recording.n_random=4",
                "recording.window=8", "recording.max_windows=40", "progress=false", "judges=null",
                "judge_power.enabled=false", "remote.cache=false", f"explainer.model={tiny_llama_dir}",
                "simulator=vllm", f"simulator.model={server.model}",
                f"simulator.base_url={server.base_url}", "simulator.scoring=prompt_logprobs",
                f"hydra.run.dir={run_dir}"]
        env = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")} | {"VLLM_API_KEY": CANARY}
        done = subprocess.run([sys.executable, "-m", "neuronlens", *args], capture_output=True,
                              text=True, timeout=300, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert server.requests["/v1/completions"] >= 3   # the simulator's, with the key
    everything = done.stdout + done.stderr + "".join(
        p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())
    assert "1 neurons of" in everything
    assert CANARY not in everything and CANARY[:20] not in everything


# ---- 11: the smaller items ---------------------------------------------------------------------
def test_excerpts_without_tokens_or_with_nan_are_dropped_with_their_reason(tmp_path, caplog):
    from neuronlens.records import ActivationRecord, NeuronId, NeuronRecord
    from neuronlens.subject.openai_records import usable_excerpts

    record = NeuronRecord(NeuronId(0, 1), [ActivationRecord([], []),
                                           ActivationRecord(["a", "b"], [1.0, float("nan")]),
                                           ActivationRecord(["c"], [2.0])],
                          [ActivationRecord(["d"], [0.0])])
    with caplog.at_level("WARNING"):
        kept = usable_excerpts(record, "x.json")
    assert [r.tokens for r in kept.most_positive_activation_records] == [["c"]]
    assert len(kept.random_sample) == 1
    assert "x.json: 1 excerpts dropped (no tokens)" in caplog.text
    assert "x.json: 1 excerpts dropped (a NaN or infinite activation)" in caplog.text


def test_report_markdown_escapes_html_from_names():
    from neuronlens.report.content import Report, Section, Table
    from neuronlens.report.render import markdown

    report = Report("<b>runs</b>", ["dir <img src=x onerror=alert(1)>"], [],
                    [Section("s", [Table(["run"], [["<script>alert(1)</script>"]])])])
    md = markdown(report)
    assert "<script" not in md and "<img" not in md and "<b>" not in md
    assert "&lt;script>alert(1)&lt;/script>" in md
