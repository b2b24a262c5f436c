"""``--help`` for the Hydra commands, written from the configs themselves: what the command does,
examples, every config group with its options (each described by its YAML file's first comment),
and every block of settings (described by its comment in the primary config)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from neuronlens.conf import CONF_DIR

WIDTH = 100


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


def settings(config: Path) -> dict[str, str]:
    """The top-level keys of a primary config with the comment on (or just above) their line."""
    out, above = {}, ""
    for line in config.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            above = line.lstrip("#").strip()
            continue
        m = re.match(r"^(\w+):\s*(?:[^#]*?)\s*(?:#\s*(.*))?$", line)
        if m and m.group(1) not in ("defaults", "hydra"):
            out[m.group(1)] = (m.group(2) or above or "").strip()
        above = ""
    return out


def help_text(command: str, config_name: str, about: str, examples: list[tuple[str, str]],
              group_names: tuple[str, ...]) -> str:
    wrap = lambda text, indent="": textwrap.fill(text, WIDTH, initial_indent=indent,   # noqa: E731
                                                 subsequent_indent=indent)
    out = [f"{command}: {about.strip()}", "", "Usage:", f"  {command} [GROUP=OPTION ...] [KEY=VALUE ...]",
           "", "Examples:"]
    for cmd, what in examples:
        out += [f"  {cmd}", f"      {what}"]
    defaults = {}
    for name in ("config", config_name):   # probe.yaml takes config.yaml's defaults, then its own
        defaults |= dict(re.findall(r"^\s*-\s*(\w+):\s*(\w+)", (CONF_DIR / f"{name}.yaml").read_text(), re.M))
    if group_names:
        out += ["", "Config groups (GROUP=OPTION; the default is marked *):"]
    for name, options in groups().items():
        if name not in group_names:
            continue
        out.append(f"  {name}:")
        for option, text in options.items():
            mark = "*" if defaults.get(name) == option else " "
            out.append(f"   {mark}{option:<16} {text}")
    keys = settings(CONF_DIR / f"{config_name}.yaml")
    if keys:
        out += ["", "Settings (KEY=VALUE, or KEY.SUB=VALUE inside a block):"]
        out += [f"  {key:<17} {text}" for key, text in keys.items()]
    out += ["", wrap(f"The full config, with every default: {command} --cfg job   "
                     f"(one block: {command} --cfg job --package BLOCK).")]
    if group_names:
        out.append(wrap(f"Your own configs: {command} --config-dir DIR (DIR/explainer/mine.yaml is then "
                        "explainer=mine), or hydra.searchpath=[file://DIR]."))
    out += [wrap("Hydra's own options: --hydra-help. Documentation: README.md and ARCHITECTURE.md in "
                 "the repository.")]
    return "\n".join(out)


def wants_help(argv: list[str]) -> bool:
    return "--help" in argv or "-h" in argv
