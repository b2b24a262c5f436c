"""A scorer whose metric is not a correlation (balanced accuracy on a toy rule) runs as a second
judge and as the main scorer, and its metric is named in the rows, summary.json, the printed
lines, judge power, the report and the viewer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import open_dict

import neuronlens.pipeline as pipeline
from neuronlens.records import ActivationRecord
from neuronlens.report.cli import main as report_main
from neuronlens.report.site import page_name, write_site
from neuronlens.scorers.base import Metric, Scorer, SimulationResult
from neuronlens.summary import headline
from test_pipeline import corpus, rows, tiny_run_config  # noqa: F401 (fixture)

BALANCED_ACCURACY = "balanced_accuracy"


class KeywordJudge(Scorer):
    """Predicts 1 at a token that is a word of the explanation (3 letters or more), 0 elsewhere,
    and scores it by the balanced accuracy of those predictions against ``activation >
    threshold``."""

    metric = Metric(BALANCED_ACCURACY, 0.0, 1.0)

    def __init__(self, threshold: float = 0.0):
        self.threshold = threshold

    def simulate(self, explanation, records):
        words = {w.lower() for w in re.findall(r"\w{3,}", explanation)}
        expected = tuple(tuple(float(t.strip().lower() in words) for t in r.tokens) for r in records)
        return SimulationResult(expected, (None,) * len(records))

    def measure(self, true, predicted):
        fires = [a > self.threshold for excerpt in true for a in excerpt]
        said = [p >= 0.5 for excerpt in predicted for p in excerpt]
        positives = sum(fires)
        if positives in (0, len(fires)):
            return {BALANCED_ACCURACY: None, "flag": "one class", "n_tokens": len(fires)}
        hits = sum(f and s for f, s in zip(fires, said))
        rejections = sum(not f and not s for f, s in zip(fires, said))
        value = (hits / positives + rejections / (len(fires) - positives)) / 2
        return {BALANCED_ACCURACY: value, "flag": None, "n_tokens": len(fires)}


TOY = {"_target_": "test_metric.KeywordJudge"}


def test_the_toy_scorer_declares_and_measures_its_metric():
    top = [ActivationRecord([" a", " dog", " ran"], [0.0, 2.0, 0.0])]
    rnd = [ActivationRecord([" the", " cat", " dog"], [0.0, 0.0, 1.0])]
    # top: fires [F T F], said [F T F] -> 1; random: fires [F F T], said [F F T] -> 1
    scored = KeywordJudge().score("a dog", top, rnd)
    assert scored.metric.name == BALANCED_ACCURACY and set(scored.scores) == {"top", "random", "all"}
    assert scored.value() == 1.0 and scored.value("top") == 1.0
    # "cat": all said [F F F | F T F]; fires [F T F | F F T] -> (0/2 + 3/4) / 2
    assert KeywordJudge().score("cat", top, rnd).value() == pytest.approx(0.375)
    assert headline(scored.scores["all"], BALANCED_ACCURACY) == 1.0
    assert headline(scored.scores["all"]) is None   # not a correlation: read by its own name


def toy_run(model_dir: Path, corpus: Path, main: bool):
    """The tiny run with the toy scorer as the main simulator (``main``) or as the only second judge."""
    cfg = tiny_run_config(model_dir, corpus)
    with open_dict(cfg):
        if main:
            cfg.simulator, cfg.judges = TOY, {}
        else:
            cfg.judges = {"toy": TOY}
    return cfg


def test_a_non_correlation_scorer_flows_through_run_report_and_viewer(tiny_llama_dir, corpus, tmp_path,  # noqa: F811
                                                                       capsys):
    root = tmp_path / "runs"
    judged = pipeline.run(toy_run(tiny_llama_dir, corpus, main=False), root / "judged")
    printed_judged = capsys.readouterr().out
    main = pipeline.run(toy_run(tiny_llama_dir, corpus, main=True), root / "main")
    printed_main = capsys.readouterr().out

    # as a second judge: its own metric beside the simulator's correlation
    scored = [r for r in rows(root / "judged") if r.get("judges")]
    assert scored
    for r in scored:
        toy = r["judges"]["toy"]
        assert r["metric"] == "correlation" and toy["metric"] == BALANCED_ACCURACY
        assert BALANCED_ACCURACY in toy["scores"]["test"]["all"]
        assert toy["score"] == headline(toy["scores"]["test"]["all"], BALANCED_ACCURACY)
        assert toy["score"] is None or 0.0 <= toy["score"] <= 1.0
    assert judged["metric"] == "correlation" and judged["judges"]["toy"]["metric"] == BALANCED_ACCURACY
    power = judged["judge_power"]
    assert power["toy"]["metric"] == BALANCED_ACCURACY and power["simulator"]["metric"] == "correlation"
    assert power["toy"]["n"] == 8 and 0.0 <= power["toy"]["mean_true"] <= 1.0
    assert "toy judge" in printed_judged and f"({BALANCED_ACCURACY})" in printed_judged
    assert "toy judge: " in printed_judged and f"(mean {BALANCED_ACCURACY}: true" in printed_judged
    assert "mean test correlation" in printed_judged

    # as the main scorer: rows, summary, printed lines and judge power in its metric
    assert all(r["metric"] == BALANCED_ACCURACY for r in rows(root / "main"))
    assert any(r["score"] is not None for r in rows(root / "main"))
    assert main["metric"] == BALANCED_ACCURACY and main["judge_power"]["simulator"]["metric"] == BALANCED_ACCURACY
    assert f"mean test {BALANCED_ACCURACY}" in printed_main
    assert f"metric: score {BALANCED_ACCURACY}" in printed_main
    saved = json.loads((root / "main" / "summary.json").read_text())
    assert saved["metric"] == BALANCED_ACCURACY

    # the report: a line per result with its metric, judge power in the judge's metric, and no
    # difference between two metrics
    report_main([str(root)])
    report = (root / "report.md").read_text()
    results = report[report.index("## Results"):report.index("## Judge power")]
    lines = [line for line in results.splitlines() if line.startswith("| R")]
    assert sum(f"| {BALANCED_ACCURACY} |" in line for line in lines) == 2
    assert sum("| correlation |" in line for line in lines) == 1
    power_lines = report[report.index("## Judge power"):].split("\n## ")[0]
    assert sum(f"| {BALANCED_ACCURACY} |" in line for line in power_lines.splitlines()) == 2

    # the viewer: the index names the mean's metric and the judge's, a neuron page each judge's
    index = (root / "main" / "viewer" / "index.html").read_text()
    assert f"mean test {BALANCED_ACCURACY}" in index
    index = write_site(root / "judged").read_text()
    assert "mean test correlation" in index and f"toy ({BALANCED_ACCURACY})" in index
    row = scored[0]
    page = (root / "judged" / "viewer" / "neurons" / page_name(row["layer"], row["index"])).read_text()
    assert f"<td>{BALANCED_ACCURACY}</td>" in page and "<td>correlation</td>" in page
