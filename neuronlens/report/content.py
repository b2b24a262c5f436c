"""What a report holds, independent of its format: sections of paragraphs, tables and figures.
``render`` writes the same content as Markdown and as HTML."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Link:
    text: str
    href: str  # relative to the report's folder


Cell = str | Link


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]


@dataclass(frozen=True)
class Figure:
    file: str  # PNG file name, written next to report.md
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    blocks: list[str | Table | Figure | list[str]] = field(default_factory=list)  # list: bullets


@dataclass
class Report:
    title: str
    header: list[str]  # lines under the title
    commands: list[str]  # commands that reproduce the runs
    sections: list[Section]
