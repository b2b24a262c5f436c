"""The whole pipeline through the HTTP backends, against neuronlens-serve on loopback.

The server runs the same tiny model as the local backend, so the HTTP runs must reproduce the
local run's explanations and scores; injected faults must cost no neuron; a rerun must be served
from the response cache without a single request.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import neuronlens.pipeline as pipeline
from agreement import assert_rows_agree
from neuronlens.conf import CONF_DIR
from neuronlens.serve import start_server


pytestmark = pytest.mark.usefixtures("instant_backoff")


@pytest.fixture(scope="module")
def corpus(corpus40) -> Path:
    return corpus40


def run(tmp_path: Path, model_dir: Path, corpus: Path, name: str, extra: list[str]) -> dict:
    overrides = [
        f"subject.model={model_dir}", "subject.device=cpu", "corpus=files",
        f"corpus.paths=[{corpus}]", "neurons.layers=[1]", "neurons.per_layer=3",
        "recording.top_k=10", "recording.n_random=10", "recording.window=12",
        "explain.max_tokens=6", "simulation.fewshot=false", "progress=false", f"remote.cache_dir={tmp_path / 'responses'}",
        "judge_power.enabled=false",   # not what these tests are about (tests/test_controls.py)
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    summary = pipeline.run(cfg, tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "neurons.jsonl").read_text().splitlines()]
    return {"summary": summary, "rows": {(r["layer"], r["index"]): r for r in rows}}


def local(model_dir: Path) -> list[str]:
    return [f"explainer.model={model_dir}", f"simulator.model={model_dir}"]


def http(server, model_dir: Path, simulator: str = "vllm") -> list[str]:
    """Both roles on ``server`` under the name it serves; k = the size of the vocabulary (the
    servers below lift vLLM's limit of 20), so that every candidate is among the top k and
    scoring is exact."""
    from transformers import AutoConfig

    url, model = server.base_url, server.model
    k = AutoConfig.from_pretrained(model_dir).vocab_size
    return ["explainer=openai", f"explainer.model={model}", f"explainer.base_url={url}",
            "explainer.completion=true", f"simulator={simulator}", f"simulator.model={model}",
            f"simulator.base_url={url}", f"simulator.top_logprobs={k}"]


def scores(result: dict) -> dict:
    return {k: (r.get("explanation"), r.get("score")) for k, r in result["rows"].items()}


def test_http_backends_reproduce_the_local_run(tiny_llama_dir, sharp_llama_dir, corpus, tmp_path):
    """Explainer and simulator on a model whose predictions vary (so that scores are well
    conditioned), locally and through the server: the same rows up to float32 rounding, within
    bounds derived from the values (tests/agreement.py)."""
    reference = run(tmp_path, tiny_llama_dir, corpus, "local", local(sharp_llama_dir))
    with start_server(str(sharp_llama_dir), device="cpu", max_logprobs=None) as server:
        for simulator, extra in (("vllm", []), ("openai", ["simulator.prompt_scoring=echo",
                                                           "simulator.completion=true"])):
            got = run(tmp_path / simulator, tiny_llama_dir, corpus, "run",
                      http(server, sharp_llama_dir, simulator) + extra)
            assert_rows_agree(got["rows"], reference["rows"])
            stats = got["summary"]["remote"]["simulator"]
            assert stats["requests"] > 0  # (repeats within a run, e.g. shared random excerpts, may hit)


def test_skipped_follow_ups_stay_within_the_bound_each_excerpt_stores(tiny_llama_dir, sharp_llama_dir,
                                                                      corpus, tmp_path):
    """simulator.follow_up_bound (opt-in) skips the "10" follow-ups that can move an expected value
    by at most the bound: fewer prompt tokens sent, every simulated value within the bound its
    excerpt stores of the exact run, and the run's largest bound in summary.json."""
    with start_server(str(sharp_llama_dir), device="cpu", max_logprobs=None) as server:
        whole = http(server, sharp_llama_dir) + ["simulator.scoring=prompt_logprobs"]   # what it skips
        exact = run(tmp_path, tiny_llama_dir, corpus, "exact", whole)
        skipped = run(tmp_path, tiny_llama_dir, corpus, "skipped", whole + ["simulator.follow_up_bound=10"])
    assert "follow_up_bound" not in exact["summary"]
    assert 0 < skipped["summary"]["follow_up_bound"] <= 10
    sent = lambda r: sum(row["usage"]["simulator"][0] for row in r["rows"].values())  # noqa: E731
    assert sent(skipped) < sent(exact)
    n_bounded = 0
    for key, row in skipped["rows"].items():
        assert row["explanation"] == exact["rows"][key]["explanation"]   # one cached explanation
        for got, want in zip(row["test_excerpts"], exact["rows"][key]["test_excerpts"], strict=True):
            bound = got.get("follow_up_bound", 0.0)
            n_bounded += bound > 0
            assert max(abs(a - b) for a, b in zip(got["simulated"], want["simulated"])) <= bound + 1e-4
    assert n_bounded > 0


def test_faults_lose_no_neuron_and_a_rerun_is_served_from_the_cache(tiny_llama_dir, corpus, tmp_path):
    faults = ["none", "none", "429", "none", "none", "500", "none", "none", "truncated", "none",
              "none", "wrong_length"]
    with start_server(str(tiny_llama_dir), device="cpu", faults=faults, retry_after=0.01,
                      max_logprobs=None) as server:
        # a third of requests fail: every one must be retried away, so the budget allows it
        extra = http(server, tiny_llama_dir) + ["remote.max_retries=30", "remote.retry_budget=1.0"]
        first = run(tmp_path, tiny_llama_dir, corpus, "first", extra)
        summary = first["summary"]
        assert summary["n_neurons"] == 3  # no neuron lost; what failed is counted, not hidden:
        assert summary["n_failed"] == sum(r.get("score") is None for r in first["rows"].values())
        assert summary["n_failed_excerpts"] == 0  # every transient fault was retried away
        # (a `wrong_length` answer to the explainer drops its one line: a counted failed
        # explanation, the neuron's row says why)
        assert summary["n_failed"] == summary["n_failed_explanations"]
        stats = first["summary"]["remote"]
        assert stats["simulator"]["retries"] + stats["explainer"]["retries"] > 0
        assert server.faults["429"] > 0 and server.faults["500"] > 0

        asked_at_load = ("/models", "/version", "/metrics")   # who the server is, and its cache
        posts = lambda: sum(n for path, n in server.requests.items() if not path.endswith(asked_at_load))  # noqa: E731
        served = posts()
        second = run(tmp_path, tiny_llama_dir, corpus, "second", extra)
        # every usable answer comes from the cache; an unusable one (the explanation cut to
        # nothing) was never stored, so only its neuron asks again
        redone = {k for k, r in first["rows"].items() if r.get("score") is None}
        assert second["summary"]["remote"]["explainer"]["cache_hits"] == 3 - len(redone)
        if not redone:
            assert posts() == served  # not one request reached the server (beyond those at load)
            assert second["summary"]["remote"]["simulator"]["requests"] == 0
        assert {k: v for k, v in scores(second).items() if k not in redone} == \
            {k: v for k, v in scores(first).items() if k not in redone}


def test_chat_only_backends_run_the_whole_pipeline_like_local(chat_model_dir, corpus, tmp_path,
                                                              monkeypatch):
    """OpenAI (chat only) and LiteLLM: explanations by chat, simulation by generated sequences
    read from output logprobs. The tiny random model rarely copies an excerpt faithfully, so many
    excerpts fail alignment: they must be counted, exactly as the local backend counts them."""
    monkeypatch.setenv("OPENAI_API_KEY", "unused")  # LiteLLM's openai/ provider wants one
    strategy = ["simulation.strategy=generated_sequence", "explain.prompt_format=chat",
                "explain.max_tokens=4"]
    reference = run(tmp_path, chat_model_dir, corpus, "local", local(chat_model_dir) + strategy)
    with start_server(str(chat_model_dir), device="cpu") as server:
        for backend, model in (("openai", server.model), ("litellm", f"openai/{server.model}")):
            extra = [f"explainer={backend}", f"explainer.model={model}",
                     f"explainer.base_url={server.base_url}", f"simulator={backend}",
                     f"simulator.model={model}", f"simulator.base_url={server.base_url}"]
            got = run(tmp_path / backend, chat_model_dir, corpus, "run", extra + strategy)
            # the tiny model's simulations barely vary: the bounds are loose, the failures exact
            assert_rows_agree(got["rows"], reference["rows"], require_conditioned=False)
            for key in ("n_failed", "n_failed_excerpts", "n_failed_explanations"):
                assert got["summary"][key] == reference["summary"][key], (backend, key)
            assert got["summary"]["remote"]["simulator"]["requests"] > 0
