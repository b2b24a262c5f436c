"""Judge power on the control neurons: a judge that reads the explanation tells true from shuffled
explanations; one that ignores it cannot, and the run says so."""

from __future__ import annotations

from omegaconf import OmegaConf

from neuronlens.scorers.base import Scorer, SimulationResult
from neuronlens.scorers.judge_power import auc, power, verdict
from neuronlens.subject.synthetic import RULES, control_neurons, make_rule

SETTINGS = OmegaConf.create({"window": 16, "top_k": 3, "n_random": 3, "max_windows": 400})


class Oracle(Scorer):
    """Simulates a control neuron exactly from its true explanation (and so a shuffled one as
    the other rule)."""

    def __init__(self):
        specs = OmegaConf.to_container(OmegaConf.load(RULES).neurons)
        self.rules = {s["explanation"]: make_rule(s) for s in specs}

    def simulate(self, explanation, records):
        rule = self.rules[explanation]
        return SimulationResult(tuple(tuple(rule(r.tokens)) for r in records), ())


class Deaf(Scorer):
    """Ignores the explanation: predicts from the tokens alone."""

    def simulate(self, explanation, records):
        return SimulationResult(tuple(tuple(float(len(t)) for t in r.tokens) for r in records), ())


def test_an_oracle_tells_true_from_shuffled_and_a_deaf_judge_cannot(tmp_path):
    controls = control_neurons(SETTINGS, tmp_path)
    assert len(controls) == 8 and all(len(n.most_positive_activation_records) == 3 for n, _ in controls)
    good = power(Oracle(), controls)
    assert good["n"] == 8 and good["mean_true"] == 1.0 and good["tells_apart"]
    assert good["difference_ci"][0] > 0.5 and good["auc"] > 0.9
    assert verdict("oracle", good).startswith("oracle: tells true from shuffled explanations")
    deaf = power(Deaf(), controls)
    assert deaf["difference"] == 0 and deaf["difference_ci"] is None and not deaf["tells_apart"]
    assert deaf["auc"] == 0.5
    assert verdict("deaf", deaf).endswith("— treat its scores as noise")


def test_auc_counts_ties_half():
    assert auc([1.0, 0.5], [0.5, 0.0]) == 0.875 and auc([], [1.0]) is None
