"""The package's layers: a module imports only from its own layer and the layers below it, so that
the tree reads as the architecture (ARCHITECTURE.md) and a new part plugs in at one place."""

from __future__ import annotations

import ast
from pathlib import Path

import neuronlens
import neuronlens.conf

ROOT = Path(neuronlens.__file__).parent
CONF = Path(neuronlens.conf.__file__).parent   # conf/ at the top, shipped as neuronlens.conf

# Each layer, and what it may import besides itself: every module of the package has one, entry
# points included (cli, and the commands of probe, report, serve and sae above it).
BASE = {"errors", "secrets", "files", "records", "prompt_format", "stats", "conf", "settings", "lazy",
        "attention"}
BELOW_PIPELINE = {"base", "models", "corpus", "summary", "backends", "explainers", "scorers", "subject"}
LAYERS = {
    "base": set(),
    "models": {"base"},
    "corpus": {"base"},
    "summary": {"base"},
    "backends": {"base", "models"},
    "explainers": {"base", "backends"},
    "scorers": {"base", "backends", "models", "summary"},
    "subject": {"base", "models", "corpus", "summary"},
    "pipeline": BELOW_PIPELINE,
    "cli": BELOW_PIPELINE | {"pipeline"},
    "report": BELOW_PIPELINE | {"cli"},
    "probe": BELOW_PIPELINE | {"pipeline", "cli"},
    "serve": BELOW_PIPELINE | {"cli"},
    "sae": BELOW_PIPELINE | {"cli"},
    "__main__": {"cli"},
}


def layer(module: str) -> str:
    """The layer of ``neuronlens.a.b``: its folder or module, or ``base`` for the bottom modules."""
    parts = module.split(".")[1:]
    head = parts[0] if parts else ""
    return "base" if head in BASE or head == "" else head


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name, the configs' package included."""
    out = {"neuronlens." + ".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in ROOT.rglob("*.py")}
    out |= {"neuronlens.conf" + "".join(f".{x}" for x in p.relative_to(CONF).with_suffix("").parts
                                        if x != "__init__"): p for p in CONF.rglob("*.py")}
    return {m.removesuffix(".__init__"): p for m, p in out.items()}


def imports(path: Path, top_only: bool = False) -> set[str]:
    """The neuronlens modules ``path`` imports (``top_only``: at module level, not inside functions)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neuronlens"):
            found.add(node.module if node.module != "neuronlens" else
                      f"neuronlens.{node.names[0].name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("neuronlens")}
    return found


def test_every_module_has_a_layer_and_imports_none_above_it():
    wrong = []
    for module, path in modules().items():
        own = layer(module)
        assert own in LAYERS, f"{module} has no layer in tests/test_layout.py"
        for imported in imports(path):
            target = layer(imported)
            if target != own and target not in LAYERS[own]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules():
    """At module level (what runs on import), the modules' imports form no cycle."""
    found = modules()
    graph = {m: {i for i in imports(p, top_only=True) if i in found and i != m} for m, p in found.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_every_package_ships_in_the_wheel():
    import tomllib

    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"neuronlens." + ".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.rglob("__init__.py")}
    assert {f.rstrip(".") for f in folders} | {"neuronlens.conf"} == listed


def test_the_explainers_and_scorers_see_only_their_protocols_inputs():
    from neuronlens.explainers.base import Explainer
    from neuronlens.scorers.base import Scorer

    assert list(Explainer.explain.__annotations__) == ["neuron", "train", "return"]
    assert list(Scorer.simulate.__annotations__) == ["explanation", "records", "return"]


def test_a_subject_declares_what_the_pipeline_asks_of_it():
    from neuronlens.subject.base import Subject
    from neuronlens.subject.openai_records import OpenAIRecordsSubject
    from neuronlens.subject.synthetic import SyntheticSubject

    assert Subject.default_splits == SyntheticSubject.default_splits == "hash"
    assert OpenAIRecordsSubject.default_splits == "openai"
    assert list(Subject.records.__annotations__) == ["neurons", "corpus", "recording", "seed", "run_dir",
                                                     "progress", "return"]


PACKAGES = ("backends", "explainers", "probe", "report", "scorers", "subject")


def test_every_package_names_its_public_classes_and_imports_them_on_first_use():
    import importlib
    import subprocess
    import sys

    for name in PACKAGES:
        package = importlib.import_module(f"neuronlens.{name}")
        assert package.__all__ and all(isinstance(getattr(package, n), type) for n in package.__all__), name
    heavy = ("torch", "matplotlib", "scipy")
    code = (f"import sys; import {', '.join(f'neuronlens.{p}' for p in PACKAGES)}; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
