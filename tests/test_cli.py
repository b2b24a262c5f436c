"""The commands as a user meets them, each run as a subprocess from a folder outside the checkout:
--help that reads like a man page, bad input found before a model loads and leaving no folder
behind, and progress=false printing the results only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neuronlens.cli.help import groups

COMMANDS = {"neuronlens": "neuronlens.cli", "neuronlens-probe": "neuronlens.probe.cli",
            "neuronlens-serve": "neuronlens.serve.command", "neuronlens-sae": "neuronlens.sae.cli"}
GROUPS = {"neuronlens": ("subject", "corpus", "explainer", "simulator"), "neuronlens-serve": (),
          "neuronlens-probe": ("subject", "corpus", "explainer", "simulator"), "neuronlens-sae": ("subject", "corpus")}


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    module = COMMANDS[args[0]]
    code = f"import sys; sys.argv = {args!r}; from {module} import main; main()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_the_app_shows_examples_groups_and_the_full_config(command, tmp_path):
    done = run([command, "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith(f"{command}: ") and "powered by Hydra" not in text
    examples = text.split("Examples:\n")[1].split("\n\n")[0].splitlines()
    assert 5 <= sum(line.startswith("  neuronlens") for line in examples) <= 8
    assert f"{command} --cfg job" in text
    if GROUPS[command]:
        lines = text.splitlines()
        for group in GROUPS[command]:
            start = lines.index(f"  {group}:") + 1
            section = lines[start:start + len(groups()[group])]
            for option, description in groups()[group].items():
                line = next(li for li in section if li[4:].startswith(option + " "))
                assert description and description in line   # every option, described
        assert text.count("*") >= len(GROUPS[command])       # the defaults are marked
    assert list(tmp_path.iterdir()) == []                    # help writes nothing


def test_help_of_every_option_has_a_description():
    for group, options in groups().items():
        for option, description in options.items():
            assert description, f"conf/{group}/{option}.yaml starts with no comment"


def test_a_missing_corpus_file_fails_before_loading_and_leaves_no_folder(tmp_path):
    broken = tmp_path / "model"   # a model folder whose weights would fail to load
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    done = run(["neuronlens", f"subject.model={broken}", "corpus=files",
                "corpus.paths=[no-such-file.txt]"], tmp_path, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("neuronlens: error: Corpus file no-such-file.txt does not exist")
    assert "Traceback" not in done.stderr and "Could not load" not in done.stderr
    assert not (tmp_path / "outputs").exists()   # no empty run folder left behind


def test_a_layer_the_model_lacks_fails_from_its_config_alone(tiny_llama_dir, tmp_path):
    no_weights = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, no_weights)
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()   # loading would fail: only config.json can have been read
    done = run(["neuronlens", f"subject.model={no_weights}", "neurons.layers=[5]"], tmp_path, 120)
    assert done.returncode == 2, done.stderr
    assert "Layer 5 is out of range: this model has 3 layers" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "outputs").exists()


def test_a_failed_start_keeps_a_folder_that_holds_results(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "neurons.jsonl").write_text('{"layer": 0, "index": 1}\n')
    done = run(["neuronlens", "corpus=files", "corpus.paths=[missing.txt]", f"hydra.run.dir={run_dir}"],
               tmp_path, 120)
    assert done.returncode == 2 and (run_dir / "neurons.jsonl").exists()


def test_progress_false_prints_the_results_only(tiny_llama_dir, corpus40, tmp_path):
    done = run(["neuronlens", f"subject.model={tiny_llama_dir}", "subject.device=cpu",
                "corpus=files", f"corpus.paths=[{corpus40}]", f"explainer.model={tiny_llama_dir}",
                f"simulator.model={tiny_llama_dir}", "neurons.layers=[1]", "neurons.per_layer=2",
                "recording.top_k=8", "recording.n_random=8", "recording.window=12", "~judges",
                "judge_power.enabled=false", "explain.max_tokens=6", "progress=false",
                "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""                       # no log lines, bars or warnings
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["neuron", "score"] and len(lines) == 4   # table + outcome
    assert len(lines) == len(set(lines))           # no line twice
    log = (tmp_path / "run" / "neuronlens.log").read_text()
    assert "Recording" in log or "L1/N" in log     # the log file keeps everything
