"""Writing a report: ``report.md`` (figures as PNG files beside it) and a self-contained
``report.html`` (the same content, figures inline as base64, from a jinja2 template)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

from neuronlens.files import write_atomic
from neuronlens.report.content import Cell, Figure, Link, Report, Table


def no_html(text: str) -> str:
    """``text`` with anything that could open an HTML tag escaped: Markdown viewers render raw
    HTML, and names (of run directories, say) come from users."""
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def _md_cell(cell: Cell) -> str:
    text = f"[{no_html(cell.text)}]({cell.href})" if isinstance(cell, Link) else no_html(cell)
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(table: Table) -> str:
    lines = ["| " + " | ".join(table.headers) + " |", "|" + "---|" * len(table.headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def markdown(report: Report) -> str:
    out = [f"# {no_html(report.title)}", "", *[f"{no_html(line)}  " for line in report.header], ""]
    if report.commands:
        out += ["Reproduce with:", "", "```bash", *report.commands, "```", ""]
    for section in report.sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                out.append(md_table(block))
            elif isinstance(block, Figure):
                out.append(f"![{no_html(block.caption)}]({block.file})\n\n*{no_html(block.caption)}*")
            elif isinstance(block, list):
                out.append("\n".join(f"- {no_html(item)}" for item in block))
            else:
                out.append(no_html(block))
            out.append("")
    return "\n".join(out)


def inline(text: str) -> Markup:
    """A paragraph's Markdown-ish inline marks (`code`, **bold**, *em*) as HTML, escaped first."""
    html = str(escape(text))
    html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
    html = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", html)
    html = re.sub(r"\*([^*]+)\*", r"<em>\1</em>", html)
    return Markup(html)


def html(report: Report) -> str:
    env = Environment(loader=PackageLoader("neuronlens.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["inline"] = inline
    env.tests["table"] = lambda b: isinstance(b, Table)
    env.tests["figure"] = lambda b: isinstance(b, Figure)
    env.tests["link"] = lambda b: isinstance(b, Link)
    env.tests["bullets"] = lambda b: isinstance(b, list)
    env.filters["b64"] = lambda data: base64.b64encode(data).decode()
    return env.get_template("report.html.j2").render(report=report)


def write(report: Report, out_dir: Path) -> list[Path]:
    """Write the report's figures, ``report.md`` and ``report.html``; returns every path written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for section in report.sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                written.append(out_dir / block.file)
                write_atomic(written[-1], block.png)
    md, page = out_dir / "report.md", out_dir / "report.html"
    write_atomic(md, markdown(report))
    write_atomic(page, html(report))
    return [md, page, *written]
