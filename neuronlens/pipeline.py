"""The run: record the chosen neurons, then explain, simulate and score each of them.

Each finished neuron is appended at once to ``neurons.jsonl``; rerunning into the same directory
skips the neurons already there, so an interrupted run loses at most the neurons in flight.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from neuronlens.backends.base import Backend, TransientError
from neuronlens.backends.policy import Policy
from neuronlens.errors import UserError
from neuronlens.explain import Explainer
from neuronlens.records import NeuronId, NeuronRecord
from neuronlens.score import fit_calibration, score, score_splits
from neuronlens.simulate import Simulator
from neuronlens.subject.models import cache_dir
from neuronlens.subject.transformer import recording_for, select_neurons  # noqa: F401 (public)

log = logging.getLogger(__name__)


def build_role(node: DictConfig, wrap, options: DictConfig, remote: DictConfig):
    """A role's config builds either a backend (wrapped in the engine) or a ready object. Remote
    backends go through the policy layer: response cache, retries, bounded concurrency, cost."""
    obj = instantiate(node)
    if not isinstance(obj, Backend):
        return obj
    if obj.remote:
        cache = (remote.cache_dir or cache_dir() / "responses") if remote.cache else None
        obj = Policy(obj, cache_dir=cache, max_retries=remote.max_retries,
                     concurrency=remote.concurrency)
    return wrap(obj, **options)


def backend_stats(role) -> dict[str, Any] | None:
    """Requests, cache hits, tokens and dollars of a role's remote backend (None when local)."""
    backend = getattr(role, "backend", None)
    return backend.stats() if isinstance(backend, Policy) else None


def process(neuron: NeuronRecord, explainer, simulator, cfg: DictConfig) -> dict[str, Any]:
    """Explain one neuron, pick the best explanation on `valid`, and score it on `test`."""
    start = time.perf_counter()
    sc = cfg.scoring
    split = lambda name: neuron.split(name, sc.split_seed)  # noqa: E731
    row: dict[str, Any] = {"layer": neuron.neuron_id.layer, "index": neuron.neuron_id.index,
                           "max_activation": neuron.max_activation}
    usage = {"explainer": [0, 0], "simulator": [0, 0]}
    failures = {"explanations": 0, "excerpts": 0}

    def failed(reason: str) -> dict[str, Any]:
        return row | {"explanation": None, "score": None, "scores": {"test": None},
                      "error": reason, "usage": usage, "failures": failures,
                      "seconds": time.perf_counter() - start}

    shown = neuron.shown(sc.split_seed)
    if not shown:
        return failed("no excerpt of this neuron fell in the train split")
    try:
        result = explainer.explain(shown, neuron=neuron)
    except TransientError as e:  # still failing after the policy's retries
        failures["explanations"] += 1
        return failed(f"the explainer failed: {e}")
    usage["explainer"] = [result.prompt_tokens, result.completion_tokens]
    failures["explanations"] = result.n_failed

    def simulate(explanation: str, records):
        sim = simulator.simulate(explanation, records)
        usage["simulator"][0] += sim.usage.prompt_tokens
        usage["simulator"][1] += sim.usage.completion_tokens
        failures["excerpts"] += sim.n_failed
        kept = [(i, list(e)) for i, e in enumerate(sim.expected) if e is not None]
        return [records[i] for i, _ in kept], [e for _, e in kept], [i for i, _ in kept]

    candidates = []
    valid = split("valid").all
    for text in result.explanations:
        entry = {"text": text}
        if len(result.explanations) > 1:
            recs, sims, _ = simulate(text, valid)
            entry["valid"] = score([r.activations for r in recs], sims).to_json()
        candidates.append(entry)
    if not candidates:
        return failed("the explainer gave no usable explanation")

    def valid_score(c: dict) -> float:
        r = (c.get("valid") or {}).get("correlation")
        return -2.0 if r is None else r

    best = max(candidates, key=valid_score)
    test = split("test")
    recs, sims, where = simulate(best["text"], test.top + test.random)  # one shared prefix
    is_top = [i < len(test.top) for i in where]
    top_recs = [r for r, t in zip(recs, is_top) if t]
    top_sims = [x for x, t in zip(sims, is_top) if t]
    rnd_recs = [r for r, t in zip(recs, is_top) if not t]
    rnd_sims = [x for x, t in zip(sims, is_top) if not t]
    scores = {name: s.to_json() for name, s in score_splits(
        [r.activations for r in top_recs], top_sims,
        [r.activations for r in rnd_recs], rnd_sims).items()}
    row["scores"] = {"test": scores}
    if sc.calibrate:
        recs, sims, _ = simulate(best["text"], split("calibration").all)
        if recs:
            calib = fit_calibration([r.activations for r in recs], sims)
            row["scores"]["calibration"] = calib.to_json()
            row["scores"]["test_calibrated"] = score(
                [r.activations for r in top_recs + rnd_recs], calib.apply(top_sims + rnd_sims)).to_json()
    excerpts = [{"kind": kind, "tokens": r.tokens, "true": r.activations, "simulated": s}
                for kind, recs, sims in (("top", top_recs, top_sims), ("random", rnd_recs, rnd_sims))
                for r, s in zip(recs, sims)]
    return row | {"explanation": best["text"], "explanations": candidates,
                  "score": scores["all"]["correlation"], "test_excerpts": excerpts,
                  "usage": usage, "failures": failures, "seconds": time.perf_counter() - start}


def check_resumable(cfg: DictConfig, run_dir: Path) -> None:
    """A run directory holds one experiment: resuming it with other settings would mix results."""
    parts = ("subject", "corpus", "neurons", "recording", "explainer", "explain", "simulator",
             "simulation", "scoring", "seed")
    setup = json.dumps({k: OmegaConf.to_container(cfg[k], resolve=True)
                        if isinstance(cfg[k], DictConfig) else cfg[k] for k in parts},
                       sort_keys=True, default=str)
    path = run_dir / "experiment.json"
    if path.exists() and path.read_text() != setup:
        raise UserError(f"{run_dir} holds a run with other settings; resume it with the same "
                        "overrides, or choose a new hydra.run.dir.")
    path.write_text(setup)


def finished(path: Path) -> dict[tuple[int, int], dict]:
    """Rows already in neurons.jsonl. A last line cut off by a crash is removed (that neuron is
    redone), so that the rows appended next start on a line of their own."""
    rows: dict[tuple[int, int], dict] = {}
    if not path.exists():
        return rows
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        path.write_text(text)
    for n, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n} is not valid JSON ({e.msg}); remove that line to "
                            "redo its neuron.") from e
        rows[(row["layer"], row["index"])] = row
    return rows


def summarise(rows: list[dict], wall: float, cfg: DictConfig, subject: str) -> dict[str, Any]:
    scored = [r["score"] for r in rows if r.get("score") is not None]
    tokens = {role: [sum(r["usage"][role][k] for r in rows) for k in (0, 1)]
              for role in ("explainer", "simulator")}
    return {
        "n_neurons": len(rows),
        "n_failed": sum(1 for r in rows if r.get("score") is None),
        "mean_score": sum(scored) / len(scored) if scored else None,
        "n_failed_excerpts": sum(r["failures"]["excerpts"] for r in rows),
        "n_failed_explanations": sum(r["failures"]["explanations"] for r in rows),
        "tokens": {role: {"prompt": p, "completion": c} for role, (p, c) in tokens.items()},
        "wall_seconds": wall,
        "subject": subject,
        "explainer": OmegaConf.select(cfg, "explainer.model", default=None),
        "simulator": OmegaConf.select(cfg, "simulator.model", default=None),
    }


def table(rows: list[dict]) -> str:
    lines = [f"{'neuron':>10}  {'score':>6}  explanation"]
    for r in sorted(rows, key=lambda r: (r["layer"], r["index"])):
        s = "  fail" if r.get("score") is None else f"{r['score']:6.3f}"
        lines.append(f"{str(NeuronId(r['layer'], r['index'])):>10}  {s}  {r.get('explanation') or r.get('error')}")
    return "\n".join(lines)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.concurrency < 1:
        raise UserError(f"concurrency must be at least 1, got {cfg.concurrency}.")
    check_resumable(cfg, run_dir)
    subject = instantiate(cfg.subject)
    neurons = subject.select(cfg.neurons, cfg.seed)
    # roles first: a missing key or a strategy the backend cannot run fails now, not after recording
    explainer = build_role(cfg.explainer, Explainer, cfg.explain, cfg.remote)
    simulator = build_role(cfg.simulator, Simulator, cfg.simulation, cfg.remote)
    for role in (explainer, simulator):
        if isinstance(getattr(role, "backend", None), Backend):
            role.backend.load()
    simulator.check()
    records = subject.records(cfg, neurons, run_dir)
    for role in (explainer, simulator):
        if hasattr(role, "prepare"):  # baselines that need every neuron (e.g. shuffled)
            role.prepare(records, cfg.scoring.split_seed)
    out = run_dir / "neurons.jsonl"
    done = finished(out)
    todo = [r for r in records if (r.neuron_id.layer, r.neuron_id.index) not in done]
    if done:
        log.info("Resuming: %d neurons already done, %d to go", len(done), len(todo))
    with open(out, "a") as sink, ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = [pool.submit(process, r, explainer, simulator, cfg) for r in todo]
        try:
            for future in as_completed(futures):
                row = future.result()
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                done[(row["layer"], row["index"])] = row
                log.info("%s: %s (%s)", NeuronId(row["layer"], row["index"]),
                         row.get("explanation"), row.get("score"))
        except BaseException:  # an error or Ctrl-C: finish nothing more, lose only what is in flight
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    rows = [done[(nid.layer, nid.index)] for nid in neurons if (nid.layer, nid.index) in done]
    summary = summarise(rows, time.perf_counter() - start, cfg, subject.name)
    summary["remote"] = {role: backend_stats(obj) for role, obj in
                         (("explainer", explainer), ("simulator", simulator))}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(rows))
    for role, stats in summary["remote"].items():
        if stats:
            cost = "unknown" if stats["cost_usd"] is None else f"${stats['cost_usd']:.4f}"
            print(f"{role}: {stats['requests']} requests, {stats['cache_hits']} from cache, "
                  f"{stats['retries']} retries, {stats['prompt_tokens']}+"
                  f"{stats['completion_tokens']} tokens, cost {cost}")
    print(f"{summary['n_neurons']} neurons, {summary['n_failed']} failed, mean test correlation "
          f"{summary['mean_score'] if summary['mean_score'] is None else round(summary['mean_score'], 3)}"
          f" -> {run_dir}")
    return summary
