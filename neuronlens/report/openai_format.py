"""A run's scored simulations in OpenAI's format, for their viewer and code.

``export_run(run_dir)`` writes, per finished neuron, one ``NeuronSimulationResults`` line into
``{out_dir}/{layer}/{index}.jsonl`` (the layout of OpenAI's published explanations, so
``explainer=load explainer.path=<out_dir>`` reads it back), built from ``neurons.jsonl``:

    NeuronSimulationResults(neuron_id, scored_explanations=[ScoredExplanation(
        explanation, ScoredSimulation(scored_sequence_simulations=[ScoredSequenceSimulation(
            SequenceSimulation(tokens, expected_activations, activation_scale,
                               distribution_values, distribution_probabilities,
                               uncalibrated_simulation),
            true_activations, ev_correlation_score, rsquared_score, absolute_dev_explained_score)
        ], ev_correlation_score, rsquared_score, absolute_dev_explained_score))])

Every object carries its ``dataclass_name``, as OpenAI's ``fast_dataclasses`` expects. Only the
chosen explanation was simulated on the test excerpts, so it is the one exported.
``distribution_values`` / ``distribution_probabilities`` are each token's distribution over
0..10 as the simulator gave it (renormalised over the digits; probabilities to 3 decimals, those
that round to 0 left out), empty for simulators that predict values directly (the similarity judge).
An undefined score (constant activations) is ``null``, as OpenAI's files have it for NaN. r² and
absolute-dev-explained follow OpenAI's definitions (uncentred denominators, `openai_dispersion`),
so that their code and viewer read the numbers they expect. With
``scoring.calibrate``, expected activations are the calibrated ones (``neuron_activations``
scale) and the raw simulation is the ``uncalibrated_simulation``. Failed neurons are skipped.
The records themselves are written by ``Recording.export_openai``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuronlens.files import dumps, write_atomic
from neuronlens.records import NeuronId
from neuronlens.report.runs import rows_of_run
from neuronlens.scorers.correlation import openai_dispersion, correlate

SIMULATED_SCALE = "simulated_normalized_activations"
NEURON_SCALE = "neuron_activations"


def sequence_simulation(tokens: list[str], expected: list[float], scale: str,
                        distribution: list[list[int]] | None = None,
                        uncalibrated: dict[str, Any] | None = None) -> dict[str, Any]:
    """``distribution``: per token, the probabilities of 0..10 in thousandths (a row's
    ``distribution``); the values that round to 0 are left out, as OpenAI's files list only
    the values they read."""
    values = [[float(v) for v, m in enumerate(token) if m > 0] for token in distribution or ()]
    probabilities = [[m / 1000 for m in token if m > 0] for token in distribution or ()]
    return {"dataclass_name": "SequenceSimulation", "tokens": tokens,
            "expected_activations": expected, "activation_scale": scale,
            "distribution_values": values, "distribution_probabilities": probabilities,
            "uncalibrated_simulation": uncalibrated}


def scored_sequence(excerpt: dict[str, Any], calibration: dict[str, float] | None) -> dict[str, Any]:
    simulation = sequence_simulation(excerpt["tokens"], excerpt["simulated"], SIMULATED_SCALE,
                                     excerpt.get("distribution"))
    expected = excerpt["simulated"]
    if calibration:
        expected = [calibration["slope"] * v + calibration["intercept"] for v in expected]
        simulation = sequence_simulation(excerpt["tokens"], expected, NEURON_SCALE,
                                         uncalibrated=simulation)
    r2, abs_dev = openai_dispersion([excerpt["true"]], [expected])
    return {"dataclass_name": "ScoredSequenceSimulation", "simulation": simulation,
            "true_activations": excerpt["true"],
            "ev_correlation_score": correlate([excerpt["true"]], [expected]).correlation,
            "rsquared_score": r2, "absolute_dev_explained_score": abs_dev}


def simulation_results(row: dict[str, Any]) -> dict[str, Any]:
    """One finished row of ``neurons.jsonl`` as an OpenAI ``NeuronSimulationResults`` object."""
    scores = row.get("scores") or {}
    calibration = scores.get("calibration") if scores.get("test_calibrated") else None
    overall = scores["test_calibrated"] if calibration else (scores.get("test") or {}).get("all") or {}
    sequences = [scored_sequence(e, calibration) for e in row.get("test_excerpts") or []]
    r2, abs_dev = openai_dispersion([s["true_activations"] for s in sequences],
                                    [s["simulation"]["expected_activations"] for s in sequences])
    scored = {"dataclass_name": "ScoredSimulation", "scored_sequence_simulations": sequences,
              "ev_correlation_score": overall.get("correlation"),
              "rsquared_score": r2, "absolute_dev_explained_score": abs_dev}
    return {"dataclass_name": "NeuronSimulationResults",
            "neuron_id": NeuronId(row["layer"], row["index"]).to_json(),
            "scored_explanations": [{"dataclass_name": "ScoredExplanation",
                                     "explanation": row["explanation"], "scored_simulation": scored}]}


def export_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write ``{out_dir}/{layer}/{index}.jsonl`` per scored neuron of ``run_dir`` (default
    ``out_dir``: ``run_dir/openai``); returns the paths written."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "openai"
    paths = []
    for row in rows_of_run(run_dir):
        if row.get("explanation") is None or not row.get("test_excerpts"):
            continue
        path = out_dir / str(row["layer"]) / f"{row['index']}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, dumps(simulation_results(row)) + "\n")
        paths.append(path)
    return paths
