"""ARCHITECTURE.md against the code: every name it quotes in backticks that is a file, a folder, a
module's attribute, a class, a method or a call signature must exist as quoted.

How a quoted name is read, within its paragraph (a list item or a block of lines):
- ``x.py``, ``x.yaml`` and ``x/``: a file or folder. A name without a slash is in the folder its
  list item is about (``- **`scorers/`** — `base.py` ...``), else at the package's top; one
  with a slash is under ``neuronlens/`` or the repository root. Templates (``<name>``) are
  checked up to their folder.
- ``module.name`` (``pipeline.run``): ``neuronlens.module`` has that attribute.
- ``CamelCase``: a class or function defined in a module the paragraph quotes, else anywhere in
  the package.
- ``lower_case``: a module or package of neuronlens, or an attribute of a class the paragraph
  quotes (``Subject``'s ``check``).
- ``name(a, b)``: as above, and its parameters (without ``self``) are named ``a, b``; with
  literal arguments (``NeuronId(15, 42)``), the signature takes them.
- ``neuronlens-x``: a console script of pyproject.toml.
Everything else (command-line settings, output files, ids) is not a name of the code.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import tomllib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "neuronlens"
DOC = ROOT / "ARCHITECTURE.md"

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)\((.*)\)")
OUTPUT = re.compile(r"\.(json|jsonl|md|html|png|txt|csv)$")
CONTEXT = re.compile(r"^- \*\*`([^`]+)/`\*\*")   # a list item about a folder


def paragraphs(text: str) -> list[str]:
    """List items and blocks of lines, code fences left out."""
    out, current, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        starts = not line.strip() or re.match(r"^(- |\d+\. |#)", line)
        if starts and current:
            out.append(" ".join(current))
            current = []
        if line.strip():
            current.append(line.strip())
    if current:
        out.append(" ".join(current))
    return out


def module_of(path: Path) -> str | None:
    """The dotted module of a file or folder under neuronlens/, or None."""
    try:
        rel = path.resolve().relative_to(PACKAGE.parent)
    except ValueError:
        return None
    if rel.parts[0] != "neuronlens":
        return None
    parts = list(rel.with_suffix("").parts) if path.suffix == ".py" else list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def definitions() -> dict[str, list[str]]:
    """Top-level class and function names of every module of the package -> their modules."""
    index: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                index.setdefault(node.name, []).append(module_of(path))
    return index


@cache
def modules() -> set[str]:
    """Every module and package name of neuronlens, by its last part and in full."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        dotted = module_of(path)
        names |= {dotted, dotted.rsplit(".", 1)[-1]}
    return names | {"neuronlens"}


@cache
def scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {}))


def find_path(name: str, context: str | None) -> Path | None:
    """The file or folder ``name`` quotes (a template up to its folder), or None."""
    name = name.split("<")[0]
    if "/" in name.rstrip("/"):
        bases = [PACKAGE, ROOT]
    else:
        bases = [PACKAGE / context, ROOT / context] if context else [PACKAGE]
        if name.endswith("/"):   # a folder: also the package's or the repository's own
            bases += [PACKAGE, ROOT]
    for base in bases:
        candidate = base / name
        if candidate.is_dir() if name.endswith("/") else candidate.is_file():
            return candidate
    return None


def modules_in(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        if path.is_dir():
            out += [m for p in sorted(path.rglob("*.py")) if (m := module_of(p))]
        elif (m := module_of(path)) is not None:
            out.append(m)
    return out


def attribute(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def resolve(name: str, mods: list[str], classes: list[type]):
    """The object ``name`` quotes in a paragraph whose modules and classes are given, or None."""
    if "." in name:
        head, *rest = name.split(".")
        obj = None
        for module in [f"neuronlens.{head}", *mods]:
            obj = attribute(module, rest[0]) if module.endswith(head) else None
            if obj is not None:
                break
        for part in rest[1:]:
            obj = getattr(obj, part, None)
        return obj
    if name[0].isupper():
        for module in mods + definitions().get(name, []):
            if (obj := attribute(module, name)) is not None:
                return obj
        return None
    for cls in classes:
        if (obj := getattr(cls, name, None)) is not None:
            return obj
    for module in mods:
        if (obj := attribute(module, name)) is not None:
            return obj
    return "module" if name in modules() else None


def check_call(name: str, args: str, obj) -> str | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = [p for p in signature.parameters if p != "self"]
    quoted = [a.strip() for a in args.split(",")] if args.strip() else []
    if all(IDENT.fullmatch(a) for a in quoted):
        if params[:len(quoted)] != quoted or any(signature.parameters[p].default is inspect.Parameter.empty
                                                 for p in params[len(quoted):]):
            return f"`{name}({args})`: the code has {name}({', '.join(params)})"
        return None
    try:
        values = [ast.literal_eval(a) for a in quoted]
    except (ValueError, SyntaxError):
        return None   # nested calls, `...`: the name was checked
    try:
        signature.bind(*values)
    except TypeError as e:
        return f"`{name}({args})`: {e}"
    return None


def stale(text: str) -> list[str]:
    problems = []
    for para in paragraphs(text):
        folder = CONTEXT.match(para)
        context = folder.group(1) if folder else None
        quoted = re.findall(r"`([^`]+)`", para)
        paths = []
        for q in quoted:   # files and folders first: they give the paragraph its modules
            if not q.endswith((".py", ".yaml", "/")) or " " in q or not q.split("<")[0]:
                continue
            found = find_path(q, context)
            if found is None:
                where = f" (in {context}/)" if context and "/" not in q.rstrip("/") else ""
                problems.append(f"`{q}`: no such file or folder{where}")
            else:
                paths.append(found)
        mods = modules_in(paths)
        classes = [obj for q in quoted if IDENT.fullmatch(q) and q[0].isupper()
                   and inspect.isclass(obj := resolve(q, mods, []))]
        for q in quoted:
            if q.startswith("neuronlens-"):
                if q not in scripts():
                    problems.append(f"`{q}`: no such console script in pyproject.toml")
                continue
            if q.endswith((".py", ".yaml", "/")) or OUTPUT.search(q):
                continue   # checked above, or a file the code writes
            call = CALL.fullmatch(q)
            name, args = (call.group(1), call.group(2)) if call else (q, None)
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
                continue   # settings, outputs, ids, paths
            if "." in name and name.split(".")[0] not in modules():
                continue   # a file name such as config.json, not a module's attribute
            obj = resolve(name, mods, classes)
            if obj is None:
                problems.append(f"`{q}`: not found in neuronlens" + (f" ({', '.join(mods)})" if mods else ""))
            elif args is not None and obj != "module" and (problem := check_call(name, args, obj)):
                problems.append(problem)
    return problems


def test_architecture_quotes_the_code_as_it_is():
    problems = list(dict.fromkeys(stale(DOC.read_text())))
    assert not problems, "ARCHITECTURE.md is stale:\n" + "\n".join(problems)


def test_a_stale_quote_is_reported():
    doc = ("- **`explainers/`** — `base.py`: the `Explainer` protocol (`explain(neuron_id, train_excerpts)`,\n"
           "  optional `prepare`); `gone.py`: nothing. See `pipeline.run`, `pipeline.nothing`,\n"
           "  `NeuronId(15, 42)`, `NeuronId(1, 2, 3)` and `neuronlens-nothing`.\n")
    problems = stale(doc)
    assert any("explain(neuron_id, train_excerpts)" in p and "explain(neuron, train)" in p for p in problems)
    assert any("`gone.py`" in p for p in problems)
    assert any("`pipeline.nothing`" in p for p in problems)
    assert any("`NeuronId(1, 2, 3)`" in p for p in problems)
    assert any("`neuronlens-nothing`" in p for p in problems)
    assert not any(q in p for p in problems for q in ("`base.py`", "`prepare`", "`pipeline.run`", "`NeuronId(15, 42)`"))
