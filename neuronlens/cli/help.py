"""``--help`` for the Hydra commands, written from the configs themselves: what the command does,
examples, every config group with its options (each described by its YAML file's first comment),
and every setting with its default and doc (read from its dataclass, ``neuronlens/settings.py``)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from neuronlens.conf import CONF_DIR

WIDTH = 100
COLUMN = 38   # where a setting's doc starts


def first_sentence(comment_lines: list[str]) -> str:
    """The first sentence of a YAML comment block (``@package`` lines skipped), cut to fit a line."""
    text = " ".join(line.lstrip("#").strip() for line in comment_lines
                    if line.startswith("#") and "@package" not in line).strip()
    sentence = re.split(r"(?<=[a-z0-9)]\.)\s+(?=[A-Z(`])", text, maxsplit=1)[0].rstrip(".:")
    return textwrap.shorten(sentence, WIDTH - 24, placeholder="...")


def describe(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    return first_sentence(lines[:next((i for i, line in enumerate(lines) if not line.startswith("#")),
                                      len(lines))])


def groups(conf_dir: Path = CONF_DIR) -> dict[str, dict[str, str]]:
    """Each config group's options and their one-line descriptions."""
    return {group.name: {f.stem: describe(f) for f in sorted(group.glob("*.yaml"))}
            for group in sorted(conf_dir.iterdir()) if group.is_dir() and any(group.glob("*.yaml"))}


def settings_lines(schema: type, skip: type | None = None) -> list[str]:
    """Each setting of ``schema`` (those of ``skip`` left out) as ``key=default  doc``, block by block."""
    from neuronlens.settings import blocks, leaves

    own = [(k, f) for k, f in leaves(schema).items() if skip is None or k not in leaves(skip)]
    own.sort(key=lambda kf: "." in kf[0])   # the top-level settings first, then block by block
    out, block = [], ""
    for key, f in own:
        head = key.split(".")[0] if "." in key else None
        if head != block:
            block = head
            doc = (blocks(schema)[head].__doc__ or "").strip() if head else "Top level."
            out.append("  (top level)" if head is None else f"  {head}: {first_sentence(['# ' + doc])}")
        text, doc = f"    {key}={default_text(f)}", doc_of(f)
        if len(text) >= COLUMN:   # a long default: the doc on the lines below
            out.append(text)
            text = ""
        out += textwrap.wrap(doc, WIDTH, initial_indent=f"{text:<{COLUMN}} ",
                             subsequent_indent=" " * (COLUMN + 1))
    return out


def doc_of(f) -> str:
    """A field's doc, with its choices."""
    choices = f.metadata.get("choices")
    return f.metadata["doc"] + (f" ({' | '.join(choices)})" if choices else "")


def default_text(f) -> str:
    """A field's default as it is written on the command line."""
    import dataclasses
    import json

    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(json.dumps(v) if isinstance(v, str) and " " in v else str(v) for v in value) + "]"
    return str(value)


def settings_table(schema: type, skip: type | None = None) -> str:
    """The settings as a Markdown table (the README's, kept equal to this by a test)."""
    from neuronlens.settings import leaves

    rows = ["| setting | default | what it does |", "|---|---|---|"]
    for key, f in leaves(schema).items():
        if skip is None or key not in leaves(skip):
            doc = doc_of(f).replace("|", "\\|")   # a | inside a Markdown table cell
            rows.append(f"| `{key}` | `{default_text(f)}` | {doc} |")
    return "\n".join(rows)


def help_text(command, schema: type) -> str:
    from neuronlens.settings import RunSettings

    wrap = lambda text, indent="": textwrap.fill(text, WIDTH, initial_indent=indent,   # noqa: E731
                                                 subsequent_indent=indent)
    name = command.name
    out = [f"{name}: {command.about.strip()}", "", "Usage:", f"  {name} [GROUP=OPTION ...] [KEY=VALUE ...]",
           "", "Examples:"]
    for cmd, what in command.examples:
        out += [f"  {cmd}", f"      {what}"]
    defaults = dict(re.findall(r"^\s*-\s*(\w+):\s*(\w+)", (CONF_DIR / "config.yaml").read_text(), re.M))
    if command.groups:
        out += ["", "Config groups (GROUP=OPTION; the default is marked *):"]
    for group, options in groups().items():
        if group not in command.groups:
            continue
        out.append(f"  {group}:")
        for option, text in options.items():
            mark = "*" if defaults.get(group) == option else " "
            out.append(f"   {mark}{option:<16} {text}")
    inherited = RunSettings if schema is not RunSettings and issubclass(schema, RunSettings) else None
    out += ["", "Settings (KEY=VALUE; each shown with its default):", *settings_lines(schema, inherited)]
    if inherited:
        out.append(wrap("and every setting of `neuronlens` (neuronlens --help)", "  "))
    out += ["", wrap(f"The full config, with every default: {name} --cfg job   "
                     f"(one block: {name} --cfg job --package BLOCK).")]
    if command.groups:
        out.append(wrap(f"Your own configs: {name} --config-dir DIR (DIR/explainer/mine.yaml is then "
                        "explainer=mine), or hydra.searchpath=[file://DIR]."))
    out += [wrap("Hydra's own options: --hydra-help. Documentation: README.md and ARCHITECTURE.md in "
                 "the repository.")]
    return "\n".join(out)


def wants_help(argv: list[str]) -> bool:
    return "--help" in argv or "-h" in argv


README_MARKERS = ("<!-- settings:begin -->\n", "<!-- settings:end -->")


def with_settings_table(readme: str) -> str:
    """``readme`` with the table between its settings markers rewritten from the schema."""
    from neuronlens.settings import RunSettings

    begin, end = README_MARKERS
    head, rest = readme.split(begin)
    return head + begin + settings_table(RunSettings) + "\n" + end + rest.split(end, 1)[1]


if __name__ == "__main__":   # python -m neuronlens.cli.help --readme [README.md]
    import sys

    if sys.argv[1:2] == ["--readme"]:
        path = Path(sys.argv[2] if len(sys.argv) > 2 else "README.md")
        path.write_text(with_settings_table(path.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"wrote the settings table into {path}")
