"""The package's layers: a module imports only from its own layer and the layers below it, so that
the tree reads as the architecture (ARCHITECTURE.md) and a new part plugs in at one place."""

from __future__ import annotations

import ast
from pathlib import Path

import neuronlens

ROOT = Path(neuronlens.__file__).parent

# Each layer, and what it may import besides itself. Top-level modules not named are the run's
# own (pipeline, cli, ...) and may import anything.
BASE = {"errors", "secrets", "files", "records", "prompt_format", "stats", "conf", "lazy"}
LAYERS = {
    "base": set(),
    "models": {"base"},
    "corpus": {"base"},
    "backends": {"base", "models"},
    "explainers": {"base", "backends"},
    "scorers": {"base", "backends", "models", "summary"},   # judge power reads the headline rule
    "subject": {"base", "models", "corpus", "summary"},
    "summary": {"base"},
}


def layer(module: str) -> str:
    """The layer of ``neuronlens.a.b``: its folder, or ``base`` for the bottom modules."""
    parts = module.split(".")[1:]
    head = parts[0] if parts else ""
    return "base" if head in BASE else head


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neuronlens"):
            found.add(node.module if node.module != "neuronlens" else
                      f"neuronlens.{node.names[0].name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("neuronlens")}
    return found


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for path in ROOT.rglob("*.py"):
        module = "neuronlens." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = layer(module)
        if own not in LAYERS:
            continue
        for imported in imports(path):
            target = layer(imported)
            if target != own and target not in LAYERS[own]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_explainers_and_scorers_see_only_their_protocols_inputs():
    from neuronlens.explainers.base import Explainer
    from neuronlens.scorers.base import Scorer

    assert list(Explainer.explain.__annotations__) == ["neuron", "train", "return"]
    assert list(Scorer.simulate.__annotations__) == ["explanation", "records", "return"]
