"""The settings, typed once (neuronlens/settings.py): every bad command line is one line with exit
status 2 and no folder left behind; a setting added only to its dataclass shows in --help and is
checked; the README's settings table is the one the schema makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from neuronlens.cli.checks import compose
from neuronlens.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def neuronlens(args: list[str], cwd: Path, module: str = "neuronlens.cli") -> subprocess.CompletedProcess:
    # subject.model points nowhere: anything that got past the checks would fail on loading it
    return subprocess.run([sys.executable, "-c", f"from {module} import main; main()", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("bad, says", [
    ("subject=sea", "no subject 'sea'; the options are gemma3, gpt2, openai_records, sae, smollm2, synthetic"),
    ("+simulator@judges.x=nope", "no simulator 'nope'; the options are detection, fuzzing, gemma3, litellm, "
                                 "local, openai, similarity, vllm, vllm_engine"),
    ("neurons.per_layr=3", "no setting neurons.per_layr; did you mean neurons.per_layer?"),
    ("simulator=fuzzing", "simulator=fuzzing answers per excerpt, not per token, so it cannot be the run's "
                          "simulator; add it as a judge beside one (+simulator@judges.NAME=OPTION)."),
    ("+simulator@judges.d=detection judges.d.threshold=high", "judges.d.threshold must be a number (got 'high')."),
    ("explainer.modle=x", "no setting explainer.modle; did you mean explainer.model?"),
    ("+foo=bar", "no setting foo; `--help` lists the settings, `--cfg job` the whole config."),
    ("+recording.windw=3", "no setting recording.windw; did you mean recording.window?"),
    ("seed=abc", "seed must be a whole number (got 'abc')."),
    ("recording.batch_size=0", "recording.batch_size must be a whole number of at least 1 (got 0)."),
    ("recording.batch_size=1.5", "recording.batch_size must be a whole number of at least 1 (got '1.5')."),
    ("neurons.layers=abc", "neurons.layers must be a list of whole numbers of 0 or more, e.g. "
                           "neurons.layers=[3,5] or null (got 'abc')."),
    ("neurons.indices=[-1]", "neurons.indices must be a list of whole numbers of 0 or more, e.g. "
                             "neurons.indices=[3,5] (got [-1])."),
    ("neurons.which=some", "neurons.which must be one of first, random, list (got 'some')."),
    ("scoring.calibrate=maybe", "scoring.calibrate must be true or false (got 'maybe')."),
    ("explain.temperature=-1", "explain.temperature must be a number of at least 0 or null (got -1.0)."),
    ("remote.max_retries=-1", "remote.max_retries must be a whole number of at least 0 (got -1)."),
    ("neurons.shard=3", "neurons.shard must be below neurons.n_shards (got shard=3, n_shards=1)."),
    ("+simulator.batchsize=4", "no setting simulator.batchsize (LocalBackend takes no batchsize); did you "
                               "mean simulator.batch_size?"),
    ("simulator.batch_size=x", "simulator.batch_size must be a whole number (got 'x')."),
    ("judges.similarity.floor=abc", "judges.similarity.floor must be a number (got 'abc')."),
    ("explainer=shuffled +explainer.inner.seed=1", "no setting explainer.inner.seed (LocalBackend takes no seed); "
     "`--help` lists the settings, `--cfg job` the whole config."),
    ("explainer._target_=neuronlens.backends.nope.Backend",
     "explainer._target_ is 'neuronlens.backends.nope.Backend', which cannot be imported (No module named "
     "'neuronlens.backends.nope'); check its spelling."),
    ("neurons.layers=[1,", "cannot read the command line: no viable alternative at input '[1,'"),
])
def test_a_bad_command_line_is_one_line_and_leaves_nothing(bad, says, tmp_path):
    done = neuronlens(["subject.model=/no/such/model", *bad.split()], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"neuronlens: error: {says}"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="^" + says.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("?", r"\?").replace("+", r"\+")):
        compose("config", ["subject.model=/no/such/model", *bad.split()])   # the same line for the API


def test_the_probe_and_serve_commands_check_their_own_settings(tmp_path):
    done = neuronlens(["probe.pooling=median"], tmp_path, "neuronlens.probe.cli")
    assert done.stderr.strip().splitlines() == [
        "neuronlens: error: probe.pooling must be one of mean, max, last (got 'median')."]
    done = neuronlens(["faults=[teapot]"], tmp_path, "neuronlens.serve.command")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "neuronlens: error: faults must be one of none, 429, 500, slow, truncated, wrong_length "
        "(got ['teapot'])."]
    done = neuronlens(["prot=1"], tmp_path, "neuronlens.serve.command")
    assert done.stderr.strip().splitlines() == ["neuronlens: error: no setting prot; did you mean port?"]


def test_judges_can_be_dropped_and_free_form_groups_take_new_keys():
    assert compose("config", ["~judges"]).judges is None
    assert list(compose("config", []).judges) == ["similarity"]
    # a group's settings are its class's arguments, listed in its YAML or not
    assert compose("config", ["+explainer.prefix_reuse=false"]).explainer.prefix_reuse is False


NEW_SETTING = """
import sys
from dataclasses import dataclass, field
from neuronlens.settings import Recording, RunSettings, register, setting

@dataclass
class MyRecording(Recording):
    stride: int = setting(4, "tokens two windows share", low=1)

@dataclass
class MySettings(RunSettings):
    recording: MyRecording = field(default_factory=MyRecording)

register("config", "run_schema", MySettings)
from neuronlens.cli.command import NEURONLENS
from neuronlens.cli.main import main
main(NEURONLENS, sys.argv[1:])
"""


def test_a_setting_added_only_to_its_dataclass_is_in_help_cfg_and_checked(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-c", NEW_SETTING, *args], capture_output=True,
                                       text=True, timeout=120, cwd=tmp_path)
    help_text = run("--help").stdout
    assert any(line.split() == ["recording.stride=4", "tokens", "two", "windows", "share"]
               for line in help_text.splitlines())
    assert "stride: 4" in run("--cfg", "job", "--package", "recording").stdout
    done = run("subject.model=/no/such/model", "recording.stride=0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "neuronlens: error: recording.stride must be a whole number of at least 1 (got 0)."]


def test_the_readme_settings_table_is_the_schemas():
    from neuronlens.cli.help import with_settings_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert with_settings_table(readme) == readme, "run: python -m neuronlens.cli.help --readme"


def test_no_second_table_of_types():
    """The settings' types live in the dataclasses only: no module keeps its own list of keys."""
    package = ROOT / "neuronlens"
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for key in ("recording.batch_size", "neurons.per_layer", "remote.max_retries"):
            assert f'"{key}"' not in text, f"{path.relative_to(ROOT)} names {key}"


def test_your_own_configs_by_config_dir_or_searchpath(tmp_path):
    mine = tmp_path / "mine"
    (mine / "explainer").mkdir(parents=True)
    (mine / "explainer" / "mine.yaml").write_text(
        "# My explainer: the top-tokens baseline, three tokens.\n"
        "_target_: neuronlens.explainers.baselines.TopTokens\nmax_tokens: 3\n")
    for how in (["--config-dir", str(mine)], [f"hydra.searchpath=[file://{mine}]"]):
        done = neuronlens([*how, "explainer=mine", "--cfg", "job", "--package", "explainer"], tmp_path)
        assert done.returncode == 0, done.stderr
        assert "TopTokens" in done.stdout and "max_tokens: 3" in done.stdout
    done = neuronlens(["--config-dir", str(mine), "explainer=minee"], tmp_path)
    assert done.returncode == 2 and "no explainer 'minee'; the options are " in done.stderr
    assert "mine," in done.stderr   # the user's own option among them
