"""The sections of a report, built from its results: the numbers, in tables and sentences."""

from __future__ import annotations

import os
from pathlib import Path

from neuronlens.report import pairs as pairing
from neuronlens import stats
from neuronlens.report.content import Link, Section, Table
from neuronlens.report.results import Result
from neuronlens.summary import LOW_MASS


def num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def ci(iv: stats.Interval | None) -> str:
    return "—" if iv is None else f"[{iv.low:.3f}, {iv.high:.3f}]"


def pval(p: float | None) -> str:
    return "—" if p is None else ("<0.0001" if p < 1e-4 else f"{p:.4f}")


def rid(results: list[Result], r: Result) -> str:
    return f"R{results.index(r) + 1}"


def method() -> Section:
    return Section("How to read this report", [
        "A *result* is one (subject, explainer, judge) triple. The judge is the simulator whose "
        "predicted activations were scored; a run gives one result for its main simulator and one per "
        "extra judge (`judges` in its rows). Every number names its judge.",
        "Scores are each judge's declared metric (the `metric` column) on each neuron's held-out `test` "
        "excerpts (top and random together): for a simulator, the Pearson correlation between simulated "
        "and true activations. Only results with one metric are compared by differences. A constant "
        "simulation (the same prediction at every token: correlation undefined) scores 0 and is counted in "
        "the `constant` column; a failed neuron has no score and is counted, not averaged in as 0. "
        "`low mass`: neurons where the judge "
        f"put less than {LOW_MASS} of its probability on the digits 0-10 on average (its score is close "
        "to a guess).",
        f"95% intervals: percentile bootstrap (`scipy.stats.bootstrap`, {stats.N_RESAMPLES:,} resamples, "
        f"seed {stats.SEED}) over neurons. Paired differences resample the per-neuron differences (paired "
        "bootstrap); p-values from the Wilcoxon signed-rank test (`scipy.stats.wilcoxon`) and the paired "
        "t-test (`scipy.stats.ttest_rel`). `—`: undefined (too few neurons, or no variation).",
    ])


def results_section(results: list[Result], viewers: dict[str, Link]) -> Section:
    main = Table(["id", "subject", "explainer", "judge", "metric", "setting", "n", "failed", "constant",
                  "low mass", "mean [95% CI]", "median [95% CI]"], [])
    cost = Table(["id", "failed neurons", "failed explanations", "failed excerpts", "tokens / neuron",
                  "$ / neuron", "wall s / neuron", "viewer"], [])
    for r in results:
        s = stats.summarise(r.scores())
        n = len(r.neurons)
        kind = {"baseline": " (baseline)", "truth": " (true explanation)"}.get(r.kind, "")
        main.rows.append([rid(results, r), r.subject, r.explainer + kind, r.judge, r.metric, r.setting or "",
                          str(n), str(r.n_failed), str(r.n_constant),
                          "—" if r.n_low_mass is None else str(r.n_low_mass), f"{num(s.mean)} {ci(s.mean_ci)}",
                          f"{num(s.median)} {ci(s.median_ci)}"])
        dollars = ("— (local)" if not r.remote else "— (unknown)" if r.cost_usd is None
                   else f"{r.cost_usd / n:.5f}" if n else "—")
        cost.rows.append([rid(results, r), str(r.n_failed), str(r.failed_explanations),
                          "—" if r.failed_excerpts is None else str(r.failed_excerpts),
                          num(r.tokens / n, 0) if n and r.tokens is not None else "—", dollars,
                          num(r.wall_seconds / n, 2) if n else "—",
                          viewers.get(str(r.experiment.first.path), "—")])
    labels = [f"{rid(results, r)}: {r.label}" for r in results]
    return Section("Results", [
        main, "Result names in full:", labels,
        "Failures, tokens, dollars and time per neuron. Wall time is the whole run's (every judge of it); "
        "dollars come from the remote backends' price tables (`—` for local backends, or an unknown price).",
        cost,
    ])


def pair_table(results: list[Result], pairs: list[pairing.Pair]) -> Table:
    table = Table(["subject", "A", "B", "n paired", "excluded", "mean A−B [95% CI]", "Wilcoxon p",
                   "t-test p"], [])
    for p in pairs:
        t = p.test()
        table.rows.append([p.a.subject, f"{rid(results, p.a)} {_side(p.a, p.factor)}",
                           f"{rid(results, p.b)} {_side(p.b, p.factor)}", str(t.n), p.excluded(),
                           f"{num(t.mean_diff)} {ci(t.ci)}", pval(t.wilcoxon_p), pval(t.ttest_p)])
    return table


def _side(r: Result, factor: str) -> str:
    """What the two sides of a pair differ in, with what they share in brackets."""
    if factor == "explainer":
        return f"explainer={r.explainer} (judge={r.judge})"
    if factor == "judge":
        return f"judge={r.judge} (explainer={r.explainer})"
    return f"{r.setting or '(default)'} (explainer={r.explainer}, judge={r.judge})"


def paired_section(results: list[Result], pairs: list[pairing.Pair]) -> Section:
    section = Section("Paired differences", [
        "Pairs of results on the same subject and recording that differ in exactly one factor, compared "
        "on the neurons both scored with identical test excerpts (tokens hashed)."])
    titles = {"explainer": "Explainers compared (same judge)",
              "judge": "Judges compared (the same explanations, scored by two judges)",
              "setting": "Other settings compared"}
    usable = [p for p in pairs if p.keys]
    elsewhere = lambda p: p.factor == "explainer" and (  # noqa: E731
        p.b.kind == "truth" or (p.a.kind == "explainer" and p.b.kind == "baseline"))
    if any(elsewhere(p) for p in usable):
        section.blocks.append("Explainers against the baselines and against the true explanation are in "
                              "their own sections above.")
    for factor, title in titles.items():
        chosen = [p for p in usable if p.factor == factor and not elsewhere(p)]
        if chosen:
            section.blocks += [f"**{title}**", pair_table(results, chosen)]
    if not usable:
        section.blocks.append("No two results could be paired.")
    return section


def unpairable_section(results: list[Result], pairs: list[pairing.Pair]) -> Section:
    groups = pairing.groups(results)
    lines = [f"group {i}: subject={members[0].subject} — " + ", ".join(rid(results, r) for r in members)
             for i, members in enumerate(groups.values(), 1)]
    blocks: list = []
    if len(groups) > 1:
        blocks += ["Results are compared only within a group (same subject, corpus, recording and test "
                   "split). Results in different groups are **not pairable** and are never mixed:", lines]
    else:
        blocks.append("All results share one subject and recording.")
    empty = [p for p in pairs if not p.keys]
    if empty:
        blocks += ["These pairs within a group are **not pairable**: no neuron with identical test excerpts "
                   "was scored by both:",
                   [f"{rid(results, p.a)} {_side(p.a, p.factor)} vs {rid(results, p.b)} {_side(p.b, p.factor)} "
                    f"(excluded: {p.excluded()})" for p in empty]]
    return Section("Not pairable", blocks)


def baseline_section(results: list[Result], pairs: list[pairing.Pair]) -> Section | None:
    baselines = [r for r in results if r.kind == "baseline"]
    if not baselines:
        return None
    table = Table(["id", "subject", "baseline", "judge", "metric", "n scored", "mean [95% CI]"], [])
    for r in baselines:
        s = stats.summarise(r.scores())
        table.rows.append([rid(results, r), r.subject, r.explainer, r.judge, r.metric, str(s.n),
                           f"{num(s.mean)} {ci(s.mean_ci)}"])
    versus = [p for p in pairs if p.keys and p.factor == "explainer" and p.a.kind == "explainer"
              and p.b.kind == "baseline"]
    blocks = ["`top_tokens` lists the tokens with the highest mean activation (the floor); `shuffled` gives "
              "each neuron another neuron's explanation (the sanity check). An explainer must beat both. "
              "`shuffled_truth` (synthetic neurons) gives each neuron another rule's true explanation: a judge "
              "that scores it like the truth cannot tell right from wrong.", table]
    if versus:
        blocks += ["Each explainer minus each baseline, same judge, same neurons:", pair_table(results, versus)]
    return Section("Baselines", blocks)


def synthetic_section(results: list[Result], pairs: list[pairing.Pair]) -> Section | None:
    truths = [r for r in results if r.synthetic and r.kind == "truth"]
    if not truths:
        return None
    table_a = Table(["id", "subject", "judge", "metric", "n scored", "mean [95% CI]", "median [95% CI]"], [])
    for r in truths:
        s = stats.summarise(r.scores())
        table_a.rows.append([rid(results, r), r.subject, r.judge, r.metric, str(s.n), f"{num(s.mean)} {ci(s.mean_ci)}",
                             f"{num(s.median)} {ci(s.median_ci)}"])
    table_b = Table(["subject", "explainer", "judge", "n paired", "mean (explainer − truth) [95% CI]",
                     "ratio of means (explainer / truth)"], [])
    for p in pairs:
        if p.keys and p.factor == "explainer" and p.b.kind == "truth" and p.a.synthetic:
            t = p.test()
            truth_mean = sum(p.b_scores) / len(p.keys)
            ratio = None if truth_mean == 0 else (sum(p.a_scores) / len(p.keys)) / truth_mean
            table_b.rows.append([p.a.subject, f"{rid(results, p.a)} {p.a.explainer}", p.a.judge, str(t.n),
                                 f"{num(t.mean_diff)} {ci(t.ci)}", num(ratio)])
    return Section("Synthetic neurons (known answers)", [
        "(a) How well each judge scores the **true** explanation of rule neurons. A simulator that cannot "
        "score the truth cannot judge anyone.", table_a,
        "(b) How close each explainer gets to the truth's score, under the same judge, on the same neurons.",
        table_b if table_b.rows else "No explainer result pairs with a true-explanation result."])


def agreement_section(results: list[Result]) -> Section:
    table = Table(["subject", "explainer", "judge A", "judge B", "source", "n", "Spearman ρ", "p"], [])
    for p in pairing.agreement_pairs(results):
        a = stats.agreement(p.a_scores, p.b_scores)
        source = "same run" if p.a.experiment is p.b.experiment else "across runs"
        table.rows.append([p.a.subject, p.a.explainer, f"{rid(results, p.a)} {p.a.judge}",
                           f"{rid(results, p.b)} {p.b.judge}", source, str(a.n),
                           f"{num(a.spearman)} {ci(a.ci)}", pval(a.p)])
    blocks: list = ["Rank correlation between two judges' scores of the very same explanations (same run, or "
                    "runs whose explanations are textually identical), every pair of judges, whatever their metrics "
                    "(simulation, detection, fuzzing). A low ρ means the ranking of neurons depends on the judge; "
                    "the interval is a paired bootstrap over neurons."]
    blocks.append(table if table.rows else "No explanation was scored by two judges.")
    return Section("Simulator agreement", blocks)


def judge_power_section(results: list[Result]) -> Section:
    """Each judge's power on the control neurons, as its run measured it (``judge_power`` in the
    first shard's summary; every shard measures the same controls)."""
    table = Table(["id", "judge", "metric", "n", "true", "shuffled", "difference [95% CI]", "AUC", "verdict"], [])
    for r in results:
        power = ((r.experiment.first.summary or {}).get("judge_power") or {}).get(r.judge_name or "simulator")
        if not power:
            continue
        ci_ = power.get("difference_ci")
        verdict = "tells them apart" if power.get("tells_apart") else "cannot tell them apart: noise"
        table.rows.append([rid(results, r), r.judge, power.get("metric") or r.metric, str(power.get("n")),
                           num(power.get("mean_true")),
                           num(power.get("mean_shuffled")),
                           f"{num(power.get('difference'))} {ci(stats.Interval(*ci_)) if ci_ else '[—]'}",
                           num(power.get("auc")), verdict])
    blocks: list = ["Can each judge tell a true explanation from a shuffled one? Every run scores 8 control "
                    "neurons with known explanations (the rules of `conf/subject/synthetic.yaml`) with each "
                    "judge, once with the true explanation and once with another rule's. A judge whose "
                    "interval is not above 0 cannot rank explanations: read its scores as noise."]
    blocks.append(table if table.rows else "No run measured judge power (`judge_power.enabled=false`, "
                                           "or runs from before it existed).")
    return Section("Judge power", blocks)


def runs_section(runs, out_dir: Path, labels: dict[str, str], viewers: dict[str, Link]) -> Section:
    table = Table(["run", "status", "experiment", "shard", "neurons", "result", "viewer"], [])
    for run in runs:
        shard = "—" if run.shard is None else f"{run.shard[0]} of {run.shard[1]}"
        table.rows.append([os.path.relpath(run.path, out_dir), "finished" if run.finished else "unfinished",
                           (run.summary or {}).get("experiment") or "—", shard, str(len(run.rows)),
                           labels.get(str(run.path), "— (unfinished: not reported)"),
                           viewers.get(str(run.path), "—")])
    return Section("Runs", [table])
