"""The run: record the chosen neurons, then explain, simulate and score each of them.

Each finished neuron is appended at once to ``neurons.jsonl``; rerunning into the same directory
skips the neurons already there, so an interrupted run loses at most the neurons in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from neuronlens.backends.base import Backend, TransientError, failure_kind
from neuronlens.backends.policy import Gate, Policy, gate_for
from neuronlens.settings import check
from neuronlens.errors import UserError
from neuronlens.explainers.base import Explainer
from neuronlens.explainers.llm import LLMExplainer, copy_flag, words
from neuronlens.files import RunLock, disk_error, dumps, read_rows, write_atomic, write_json
from neuronlens.records import NeuronId, NeuronRecord
from neuronlens.scorers.base import Scorer, split_predictions
from neuronlens.scorers.correlation import correlate, fit_calibration
from neuronlens.scorers.judge_power import judge_power, verdict
from neuronlens.scorers.simulation import Simulator
from neuronlens.models import cache_dir, display_name
from neuronlens.prompt_format import normalize_activations
from neuronlens.summary import CONSTANT, CORRELATION, LOW_MASS, headline, mass_stats, summarise_rows

log = logging.getLogger(__name__)


def build_role(node: DictConfig, wrap, options: DictConfig, remote: DictConfig,
               gates: dict[str, Gate] | None = None):
    """A role's config builds either a backend (wrapped in the engine) or a ready object. Remote
    backends go through the policy layer: response cache, retries, bounded concurrency (one
    budget per server address in ``gates``), cost. A role with an ``inner`` role
    (``explainer=shuffled``) gets that role built the same way; one with a ``backend`` (detection,
    fuzzing) gets that backend, behind the policy layer too, and scores with it itself."""
    gates = {} if gates is None else gates
    if "inner" in node:
        obj = instantiate(node, inner=build_role(node.inner, wrap, options, remote, gates))
    elif "backend" in node:   # a scorer on a backend of its own (detection, fuzzing): not wrapped
        obj = instantiate(node, backend=build_role(node.backend, lambda b, **_: b, options, remote, gates))
    else:
        obj = instantiate(node)
    if not isinstance(obj, Backend):
        return obj
    if obj.remote:
        cache = (remote.cache_dir or cache_dir() / "responses") if remote.cache else None
        obj = Policy(obj, cache_dir=cache, max_retries=remote.max_retries,
                     concurrency=remote.concurrency, retry_budget=remote.get("retry_budget", 0.2),
                     gate=gate_for(obj, remote.concurrency, gates))
    return wrap(obj, **options)


def build_roles(cfg: DictConfig) -> tuple[Explainer, Scorer, dict[str, Scorer]]:
    """The explainer, the simulator and the second judges, loaded and checked: a missing key or
    a strategy a backend cannot run fails here, before anything slow."""
    gates: dict[str, Gate] = {}   # the roles on one server share its concurrency budget
    explainer = build_role(cfg.explainer, LLMExplainer, cfg.explain, cfg.remote, gates)
    simulator = build_role(cfg.simulator, Simulator, cfg.simulation, cfg.remote, gates)
    judges = {name: build_role(node, Simulator, cfg.simulation, cfg.remote, gates)
              for name, node in (cfg.get("judges") or {}).items() if node != cfg.simulator}
    if cfg.explain.get("revisions", 0) and not hasattr(explainer, "revise"):
        raise UserError(f"explain.revisions={cfg.explain.revisions} needs an explainer that writes explanations "
                        f"(local, openai, vllm, litellm); {type(explainer).__name__} cannot revise one.")
    for role in (explainer, simulator, *judges.values()):
        if isinstance(getattr(role, "backend", None), Backend):
            role.backend.load()
    for role in (simulator, *judges.values()):
        role.check()
    return explainer, simulator, judges


def prepare_explainer(explainer: Explainer, records: list[NeuronRecord], cfg: DictConfig) -> None:
    """Give the explainer every neuron's train excerpts (the shuffled baseline swaps between
    them) and, with ``explain.show_logits``, the output logits (from the weights, never from an
    excerpt); nothing else of a record ever reaches an explainer."""
    explainer.prepare({r.neuron_id: r.shown(cfg.scoring.split_seed) for r in records})
    if getattr(explainer, "show_logits", False):   # from the weights: no excerpt of any split
        explainer.outputs = {r.neuron_id: r.logits for r in records if r.logits}
        if len(explainer.outputs) < len(records):
            log.warning("explain.show_logits: %d of %d neurons have no output logits (only model "
                        "subjects have them); they are explained from their excerpts alone.",
                        len(records) - len(explainer.outputs), len(records))


def backend_stats(role) -> dict[str, Any] | None:
    """Requests, cache hits, tokens and dollars of a role's remote backend (None when local)."""
    backend = getattr(role, "backend", None)
    return backend.stats() if isinstance(backend, Policy) else None


def judge(judges: dict[str, Scorer], explanation: str, top, rnd, quantile=()) -> dict[str, Any]:
    """The kept explanation scored again by each second judge, on the very excerpts the main
    simulator scored (so the two are paired), and on the split's ``quantile`` samples where the
    judge reads them, in the judge's own metric; ``test_simulated`` (per token) or
    ``test_predictions`` (per item: detection, fuzzing) is aligned with ``test_excerpts`` (None
    where this judge failed an excerpt)."""
    out = {}
    for name, scorer in judges.items():
        more = {"quantile": quantile} if quantile and getattr(scorer, "quantiles", False) else {}
        scored = scorer.score(explanation, top, rnd, **more)
        sim, scores = scored.result, scored.scores
        expected = [None if e is None else list(e) for e in sim.expected]
        masses = [{"mass": m} for e, m in zip(expected, sim.mass or [None] * len(expected))
                  if e is not None and m]
        predicted = ({"test_simulated": expected} if getattr(scorer, "per_token", True) else   # per token, or per item
                     {"test_predictions": [None if p is None else list(p)
                                           for p in scored.predictions[:len(top) + len(rnd)]]})
        out[name] = {"score": scored.value(), "metric": scored.metric.name,
                     "score_flag": scores["all"].get("flag"),
                     "mass": mass_stats(masses), "scores": {"test": scores}, **predicted,
                     "failed_excerpts": sim.n_failed, "failures": [f.to_json() for f in sim.failures],
                     "usage": [sim.usage.prompt_tokens, sim.usage.completion_tokens]}
    return out


def process(neuron: NeuronRecord, explainer: Explainer, simulator: Scorer, cfg: DictConfig,
            judges: dict[str, Scorer] | None = None) -> dict[str, Any]:
    """Explain one neuron, pick the best explanation on `valid`, score it on `test`, and have the
    second judges (if any) score it too."""
    start = time.perf_counter()
    sc, metric = cfg.scoring, simulator.metric
    split = lambda name: neuron.split(name, sc.split_seed)  # noqa: E731
    row: dict[str, Any] = {"layer": neuron.neuron_id.layer, "index": neuron.neuron_id.index,
                           "max_activation": neuron.max_activation}
    if neuron.logits:   # what the neuron's output promotes and suppresses (direct path)
        row["logits"] = neuron.logits
    if neuron.density is not None:   # the fraction of corpus tokens on which it is above 0
        row["density"] = neuron.density
    usage = {"explainer": [0, 0], "simulator": [0, 0]}
    phases = {"explain": 0.0, "simulate": 0.0, "judges": 0.0}   # seconds of this neuron in each
    by_kind: Counter[str] = Counter()
    failures: dict[str, Any] = {"explanations": 0, "excerpts": 0, "by_kind": by_kind}
    failed_excerpts: list[dict] = []   # each with its stage, index, kind and message

    def failed(reason: str, kind: str) -> dict[str, Any]:
        by_kind[kind] += 1
        return row | {"explanation": None, "score": None, "metric": metric.name, "scores": {"test": None},
                      "error": reason, "error_kind": kind, "usage": usage, "failures": failures,
                      "failed_excerpts": failed_excerpts, "seconds": time.perf_counter() - start,
                      "phase_seconds": phases}

    if neuron.max_activation <= 0:   # an SAE's dead latent, say: no LLM call can explain it
        return failed("it is never above 0 on the recorded corpus (a dead unit); there is nothing to "
                      "explain", "dead_unit")
    shown = neuron.shown(sc.split_seed)
    if not shown:
        return failed("no excerpt of this neuron fell in the train split", "no_train_excerpts")
    try:
        result = explainer.explain(neuron.neuron_id, shown)
    except TransientError as e:  # still failing after the policy's retries
        failures["explanations"] += 1
        return failed(f"the explainer failed: {e}", failure_kind(e))
    finally:
        phases["explain"] = time.perf_counter() - start
    simulating = time.perf_counter()
    usage["explainer"] = [result.prompt_tokens, result.completion_tokens]
    failures["explanations"] = result.n_failed
    if result.n_failed:
        by_kind["unparsed_explanation"] = result.n_failed

    def account(sim, stage: str) -> None:
        usage["simulator"][0] += sim.usage.prompt_tokens
        usage["simulator"][1] += sim.usage.completion_tokens
        failures["excerpts"] += sim.n_failed
        for f in sim.failures:
            by_kind[f.kind] += 1
            failed_excerpts.append({"stage": stage} | f.to_json())

    def simulate(explanation: str, records, stage: str):
        sim = simulator.simulate(explanation, records)
        account(sim, stage)
        kept = [(i, list(e)) for i, e in enumerate(sim.expected) if e is not None]
        return [records[i] for i, _ in kept], [e for _, e in kept]

    candidates = [{"text": text} for text in result.explanations]
    valid = split("valid")
    if len(candidates) > 1:   # best of n: the candidates simulated together where the scorer can
        for entry, scored in zip(candidates, simulator.score_many(result.explanations, valid.top, valid.random)):
            account(scored.result, "valid")
            entry["valid"] = scored.scores["all"]
    if not candidates:
        phases["simulate"] = time.perf_counter() - simulating
        return failed("the explainer gave no usable explanation", "no_explanation")

    # the headline rule (a constant simulation scores 0), the better end of the metric first
    rank = lambda c: metric.rank(headline(c.get("valid"), metric.name))   # noqa: E731
    best = max(candidates, key=rank)
    revisions = []
    for _ in range(getattr(explainer, "revisions", 0)):   # explain.revisions
        if "valid" not in best:
            scored = simulator.score(best["text"], valid.top, valid.random)
            account(scored.result, "valid")
            best["valid"] = scored.scores["all"]
        # what the explainer was shown, simulated from its explanation: the largest misses first
        recs, sims = simulate(best["text"], shown, "revision")
        if not recs:
            break
        scale = max(r.max_activation for r in recs)
        miss = lambda pair: float(np.mean((np.asarray(normalize_activations(pair[0].activations, scale))   # noqa: E731
                                           - np.asarray(pair[1])) ** 2))
        try:
            revised = explainer.revise(neuron.neuron_id, best["text"], sorted(zip(recs, sims), key=miss, reverse=True))
        except TransientError as e:
            failures["explanations"] += 1
            by_kind[failure_kind(e)] += 1
            break
        usage["explainer"] = [usage["explainer"][0] + revised.prompt_tokens,
                              usage["explainer"][1] + revised.completion_tokens]
        if not revised.explanations:
            failures["explanations"] += revised.n_failed
            by_kind["unparsed_explanation"] += revised.n_failed
            break
        text = revised.explanations[0]
        if words(text) == words(best["text"]):   # the same words again: nothing to score
            revisions.append({"text": text, "valid": best["valid"], "revises": best["text"], "won": False,
                              "unchanged": True})
            continue
        scored = simulator.score(text, valid.top, valid.random)
        account(scored.result, "valid")
        entry = {"text": text, "valid": scored.scores["all"], "revises": best["text"]}
        entry["won"] = rank(entry) > rank(best)   # a tie keeps the explanation it revises
        revisions.append(entry)
        if entry["won"]:
            best = {"text": entry["text"], "valid": entry["valid"]}
    if revisions:
        row["revisions"] = revisions
    test = split("test")
    scored = simulator.score(best["text"], test.top, test.random)   # one shared prefix
    account(scored.result, "test")
    sim, scores = scored.result, scored.scores
    kept = split_predictions(test.top, test.random, sim.expected)
    row["scores"] = {"test": scores}
    if sc.calibrate:
        recs, sims = simulate(best["text"], split("calibration").all, "calibration")
        if recs:
            calib = fit_calibration([r.activations for r in recs], sims)
            row["scores"]["calibration"] = calib.to_json()
            row["scores"]["test_calibrated"] = correlate(
                [p.record.activations for p in kept["all"]],
                calib.apply([p.predicted for p in kept["all"]])).to_json()
    excerpts = []
    for kind in ("top", "random"):   # tops first, then randoms, as in kept["all"]
        for p in kept[kind]:
            excerpt = {"kind": kind, "tokens": p.record.tokens, "true": p.record.activations,
                       "simulated": p.predicted}
            if p.record.text:   # split characters whole, to show
                excerpt["text"] = list(p.record.text)
            if p.index < len(sim.mass) and sim.mass[p.index]:   # the probability on "0".."10"
                excerpt["mass"] = [round(m, 4) for m in sim.mass[p.index]]   # before renormalising
            if p.index < len(sim.bound) and sim.bound[p.index]:   # skipped follow-ups (opt-in)
                excerpt["follow_up_bound"] = round(sim.bound[p.index], 4)
            if p.index < len(sim.distributions) and sim.distributions[p.index]:
                excerpt["distribution"] = [per_mille(d) for d in sim.distributions[p.index]]
            excerpts.append(excerpt)
    phases["simulate"] = time.perf_counter() - simulating
    if skipped := [e["follow_up_bound"] for e in excerpts if "follow_up_bound" in e]:
        row["follow_up_bound"] = max(skipped)   # the most any simulated value here can be off
    if judges:
        judging = time.perf_counter()
        row["judges"] = judge(judges, best["text"], [p.record for p in kept["top"]],
                              [p.record for p in kept["random"]], test.quantile)
        phases["judges"] = time.perf_counter() - judging
    row["explanation_flag"] = copy_flag(best["text"])   # a copy of the prompt says nothing
    row["copies_replaced"] = getattr(result, "n_copies_replaced", 0)
    return row | {"explanation": best["text"], "explanations": candidates,
                  "score": scored.value(), "metric": metric.name, "score_flag": scores["all"].get("flag"),
                  "mass": mass_stats(excerpts), "test_excerpts": excerpts,
                  "usage": usage, "failures": failures, "failed_excerpts": failed_excerpts,
                  "seconds": time.perf_counter() - start, "phase_seconds": phases}


def per_mille(probs: Sequence[float]) -> list[int]:
    """A token's distribution over 0..10 in thousandths, to keep rows small (the expected value
    is kept exactly in ``simulated``)."""
    return [round(p * 1000) for p in probs]


EXPERIMENT = ("subject", "corpus", "neurons", "recording", "explainer", "explain", "simulator",
              "judges", "simulation", "scoring", "seed")


def experiment(cfg: DictConfig) -> dict[str, Any]:
    """The settings that make a run's results what they are (not paths, progress bars, ...)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig)
            else cfg[k] for k in EXPERIMENT if k in cfg}


def experiment_id(cfg: DictConfig) -> str:
    """A hash of the experiment without its shard: the shards of one experiment share it, so the
    report can merge them."""
    setup = experiment(cfg)
    setup["neurons"] = {k: v for k, v in setup["neurons"].items() if k not in ("shard", "n_shards")}
    return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_resumable(cfg: DictConfig, run_dir: Path) -> None:
    """A run directory holds one experiment: resuming it with other settings would mix results.
    A directory without results yet (a failed start) takes the new settings."""
    setup = json.dumps(experiment(cfg), sort_keys=True, default=str)
    path = run_dir / "experiment.json"
    has_results = (run_dir / "neurons.jsonl").exists() and (run_dir / "neurons.jsonl").stat().st_size
    if has_results and path.exists() and path.read_text() != setup:
        raise UserError(f"{run_dir} holds a run with other settings; resume it with the same "
                        "overrides, or choose a new hydra.run.dir.")
    write_atomic(path, setup)


def shard(neurons: list[NeuronId], index: int | None, count: int) -> list[NeuronId]:
    """Every ``count``-th neuron from ``index``: the part of the neurons one job of a sharded
    sweep does (``neurons.shard=0,1,2 neurons.n_shards=3``)."""
    if count < 1 or (index is not None and not 0 <= index < count):
        raise UserError(f"neurons.shard must be in [0, neurons.n_shards) and n_shards at least 1 "
                        f"(got shard={index}, n_shards={count}).")
    return neurons if index is None else neurons[index::count]


def finished(path: Path) -> dict[tuple[int, int], dict]:
    """Rows already in neurons.jsonl. A last line cut off by a crash is removed (that neuron is
    redone), so that the rows appended next start on a line of their own."""
    if path.exists():
        text = path.read_text()
        if text and not text.endswith("\n"):
            write_atomic(path, text[:text.rfind("\n") + 1])
    return {(r["layer"], r["index"]): r for r in read_rows(path)}


# Failures that a rerun cannot change: the neuron is kept as it is. Any other failure (server
# down, timeout, rate limit, an answer that did not parse) is redone when the run is resumed.
PERMANENT = frozenset({"no_train_excerpts", "dead_unit", "unscorable", "misaligned"})


def redo_kinds(row: dict) -> set[str]:
    """The transient failure kinds in a finished row (the neuron's own, its excerpts' and its
    judges'): a row with any is redone on resume."""
    kinds = {row.get("error_kind")} if row.get("error") else set()
    kinds |= {f.get("kind") for f in row.get("failed_excerpts") or ()}
    for j in (row.get("judges") or {}).values():
        kinds |= {f.get("kind") for f in j.get("failures") or ()}
    return {str(k) for k in kinds if k is not None} - PERMANENT


def resume(path: Path, keys: set[tuple[int, int]]) -> dict[tuple[int, int], dict]:
    """The finished rows of this run to keep. Rows that failed for a transient cause are dropped
    from ``neurons.jsonl`` (rewritten atomically), so their neurons are redone."""
    done = finished(path)
    redo = {k: kinds for k, r in done.items() if k in keys and (kinds := redo_kinds(r))}
    kept = {k: r for k, r in done.items() if k not in redo}
    if redo:
        write_atomic(path, "".join(dumps(r) + "\n" for r in kept.values()))
        counts = Counter(k for kinds in redo.values() for k in kinds)
        log.info("Redoing %d neurons that failed for a transient cause (%s)", len(redo),
                 ", ".join(f"{k} {n}" for k, n in counts.most_common()))
    failed = sum(1 for k, r in kept.items() if k in keys and r.get("score") is None)
    if kept:
        log.info("Resuming: %d neurons already done (%d of them failed for good: %s), %d to go",
                 len(kept), failed, ", ".join(sorted({str(r.get("error_kind")) for r in kept.values()
                                                      if r.get("score") is None})) or "none",
                 len(keys - kept.keys()))
    return kept


def summarise(rows: list[dict], wall: float, cfg: DictConfig, subject: str) -> dict[str, Any]:
    return summarise_rows(rows) | {
        "wall_seconds": wall,
        "seconds": phase_seconds(rows),
        **({"follow_up_bound": max(bounds)} if (bounds := [r["follow_up_bound"] for r in rows
                                                            if "follow_up_bound" in r]) else {}),
        "subject": subject,
        "explainer": model_name(cfg, "explainer"),
        "simulator": model_name(cfg, "simulator"),
        "choices": choices(),
        "experiment": experiment_id(cfg),
        "shard": (None if cfg.neurons.get("shard") is None
                  else [cfg.neurons.shard, cfg.neurons.get("n_shards", 1)]),
    }


def phase_seconds(rows: list[dict]) -> dict[str, float]:
    """Seconds per phase of the neurons' work, summed over the neurons done in this run (with
    ``concurrency`` > 1 they overlap, so the sums can exceed the wall time); rows resumed from an
    earlier run count with the time they took then."""
    phases = [r.get("phase_seconds") or {} for r in rows]
    return {name: round(sum(p.get(name, 0.0) for p in phases), 2)
            for name in ("explain", "simulate", "judges")}


def model_name(cfg: DictConfig, role: str) -> str | None:
    """The role's model as tables show it ("SmolLM2-135M-Instruct (embedded)"), or None. A part
    whose ``model`` means something of its own (the similarity judge's sentence encoder) names it
    with its class's ``display_model``."""
    model = OmegaConf.select(cfg, f"{role}.model", default=None)
    if model is None:
        return None
    target = OmegaConf.select(cfg, f"{role}._target_", default=None)
    return getattr(get_class(target) if target else None, "display_model", display_name)(model)


def choices() -> dict[str, str]:
    """The config-group options this run was composed from (subject=..., explainer=..., ...),
    which the report uses to name runs; empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    picked = HydraConfig.get().runtime.choices
    return {k: v for k, v in picked.items() if not k.startswith("hydra") and v is not None}


def judge_names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(name for r in rows for name in r.get("judges", {})))


def table(rows: list[dict]) -> str:
    """One line per neuron: the main simulator's test score and digit mass, each second judge's
    score (each in its judge's metric), and the explanation. Marks: ``c`` a constant simulation
    (scored 0), ``m`` digit mass below LOW_MASS (the score is close to a guess). A last line names
    the metric of each column that is not a correlation."""
    names = judge_names(rows)
    summary = summarise_rows(rows)
    metrics = {"score": summary["metric"]} | {n: j["metric"] for n, j in summary["judges"].items()}
    other = {column: m for column, m in metrics.items() if m != CORRELATION}

    def fmt(entry: dict | None) -> str:
        if not entry or entry.get("score") is None:
            return "  fail "
        mark = ("c" if entry.get("score_flag") == CONSTANT else
                "m" if (entry.get("mass") or {}).get("mean", 1.0) < LOW_MASS else " ")
        return f"{entry['score']:6.3f}{mark}"

    lines = [f"{'neuron':>10}  {'score':>7}  {'mass':>5}  " + "".join(f"{n[:9]:>9}  " for n in names)
             + "explanation"]
    for r in sorted(rows, key=lambda r: (r["layer"], r["index"])):
        judged = "".join(f"{fmt(r.get('judges', {}).get(n)):>9}  " for n in names)
        mass = (r.get("mass") or {}).get("mean")
        lines.append(f"{NeuronId(r['layer'], r['index'])!s:>10}  {fmt(r):>7}  "
                     f"{'' if mass is None else f'{mass:.2f}':>5}  {judged}"
                     f"{r.get('explanation') or r.get('error')}"
                     + (f"  [{r['explanation_flag']}]" if r.get("explanation_flag") else ""))
    if other:
        lines.append("metric: " + ", ".join(f"{column} {m}" for column, m in other.items())
                     + ("; the other columns: correlation" if len(other) < len(metrics) else ""))
    return "\n".join(lines)


def role_label(summary: dict[str, Any], role: str) -> str:
    """A role as the printed lines name it: its config choice and model, e.g. "local
    (SmolLM2-135M-Instruct (embedded))"."""
    choice, model = summary["choices"].get(role), summary.get(role)
    return f"{choice} ({model})" if choice and model else str(choice or model)


def outcome(summary: dict[str, Any]) -> str:
    """The counts and both means, in words: 'N neurons of S: a scored (b constant, scored 0), c failed;
    mean test correlation x (y over the d with a defined score)', naming the simulator's metric."""
    r3 = lambda x: None if x is None else round(x, 3)   # noqa: E731
    n_def = summary["n_scored"] - summary["n_constant"]
    text = (f"{summary['n_neurons']} neurons of {summary.get('subject') or 'the subject'}: "
            f"{summary['n_scored']} scored ({summary['n_constant']} "
            f"constant simulations, scored 0), {summary['n_failed']} failed")
    if summary.get("n_undefined"):
        text += f", {summary['n_undefined']} undefined (constant true activations)"
    text += f"; mean test {summary.get('metric', CORRELATION)} {r3(summary['mean_score'])}"
    if summary["n_constant"]:
        text += f" ({r3(summary['mean_defined_score'])} over the {n_def} with a defined score)"
    if summary.get("n_copied") or summary.get("n_copies_replaced"):
        text += (f"; {summary['n_copied']} explanations copy the prompt (flagged), "
                 f"{summary['n_copies_replaced']} copies asked again")
    mass = summary.get("mass")
    if mass:
        text += (f"; digit mass median {mass['median_of_means']:.3f}, {mass['n_low']} below "
                 f"{LOW_MASS} (marked m)")
    return text


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    check(cfg)   # types and ranges: before anything is written or loaded
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(run_dir, e) from e
    with RunLock(run_dir):
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    check_resumable(cfg, run_dir)
    subject = instantiate(cfg.subject)
    corpus = instantiate(cfg.corpus)   # a missing or unreadable corpus file fails now, in one line,
    subject.check(cfg.neurons)         # and so does a layer the model lacks (from its config.json)
    # the roles before the subject model: a missing key, an unreachable server or a strategy the
    # backend cannot run fails now, not after a model has loaded and the corpus been recorded
    explainer, simulator, judges = build_roles(cfg)
    clock = {"load": time.perf_counter() - start}
    neurons = shard(subject.select(cfg.neurons, cfg.seed), cfg.neurons.get("shard"),
                    cfg.neurons.get("n_shards", 1))
    recording = time.perf_counter()
    records = subject.records(neurons, corpus, cfg.recording, cfg.seed, run_dir, cfg.progress)
    clock["record"] = time.perf_counter() - recording   # the subject model's loading included
    working = time.perf_counter()
    scheme = cfg.scoring.get("splits", "auto")
    for record in records:   # OpenAI's records come in their order: their splits by default
        record.split_scheme = subject.default_splits if scheme == "auto" else scheme
    prepare_explainer(explainer, records, cfg)
    out = run_dir / "neurons.jsonl"
    done = resume(out, {(r.neuron_id.layer, r.neuron_id.index) for r in records})
    todo = [r for r in records if (r.neuron_id.layer, r.neuron_id.index) not in done]
    with open(out, "a") as sink, ThreadPoolExecutor(max_workers=cfg.concurrency) as pool, \
            tqdm(total=len(todo), desc="neurons", unit="neuron", disable=not cfg.progress) as bar:
        futures = [pool.submit(process, r, explainer, simulator, cfg, judges) for r in todo]
        try:
            for future in as_completed(futures):
                row = future.result()
                try:
                    sink.write(dumps(row) + "\n")
                    sink.flush()
                except OSError as e:
                    raise disk_error(out, e) from e
                done[(row["layer"], row["index"])] = row
                bar.update()
                log.info("%s: %s (%s)", NeuronId(row["layer"], row["index"]),
                         row.get("explanation"), row.get("score"))
        except BaseException:  # an error or Ctrl-C: finish nothing more, lose only what is in flight
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    rows = [done[(nid.layer, nid.index)] for nid in neurons if (nid.layer, nid.index) in done]
    clock["neurons"] = time.perf_counter() - working
    power = cfg.get("judge_power")
    if power is not None and power.enabled:
        from neuronlens.subject.synthetic import control_neurons   # torch: only when asked for

        powering = time.perf_counter()
        controls = control_neurons(power, run_dir / "controls")
        power_of = judge_power({"simulator": simulator, **judges}, controls)
        clock["judge_power"] = time.perf_counter() - powering
    summary = summarise(rows, time.perf_counter() - start, cfg, subject.name)
    summary["seconds"] = {k: round(v, 2) for k, v in clock.items()} | summary["seconds"]
    if power is not None and power.enabled:
        summary["judge_power"] = power_of
    summary["remote"] = {role: backend_stats(obj) for role, obj in
                         (("explainer", explainer), ("simulator", simulator),
                          *((f"judge:{name}", j) for name, j in judges.items()))}
    write_json(run_dir / "summary.json", summary)
    print(table(rows))
    for role, stats in summary["remote"].items():
        if stats:
            cost = "unknown" if stats["cost_usd"] is None else f"${stats['cost_usd']:.4f}"
            print(f"{role}: {stats['requests']} requests, {stats['cache_hits']} from cache, "
                  f"{stats['retries']} retries, {stats['prompt_tokens']}+"
                  f"{stats['completion_tokens']} tokens, cost {cost}")
    r3 = lambda x: None if x is None else round(x, 3)   # noqa: E731
    judged = "".join(f", {name} judge {r3(j['mean_score'])}"
                     + ("" if j.get("metric", CORRELATION) == CORRELATION else f" ({j['metric']})")
                     for name, j in summary["judges"].items())
    if summary["failures_by_kind"]:
        print(f"failures: {summary['n_failed_excerpts']} excerpts, {summary['n_failed_explanations']} "
              "explanations, by kind: " + ", ".join(f"{k} {n}" for k, n in summary["failures_by_kind"].items()))
    print(f"{outcome(summary)} (simulator {role_label(summary, 'simulator')}){judged} -> {run_dir}")
    for name, p in (summary.get("judge_power") or {}).items():
        label = f"simulator {role_label(summary, 'simulator')}" if name == "simulator" else f"{name} judge"
        print(verdict(label, p))
    return summary
