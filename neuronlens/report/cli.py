"""``neuronlens-report DIR [--out OUTDIR] [--merge OUT]``: compare the runs under DIR (one run or a
whole Hydra multirun) in report.md and report.html, or join the shards of each experiment into one
run directory each."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from neuronlens.cli import fail_cleanly
from neuronlens.errors import UserError

log = logging.getLogger("neuronlens.report")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="neuronlens-report", description="Compare neuronlens runs: a Markdown and HTML report with "
        "bootstrap intervals, paired tests, judge agreement and plots.")
    parser.add_argument("dir", type=Path, help="a run directory, or a folder of runs (e.g. a Hydra multirun)")
    parser.add_argument("--out", type=Path, default=None, help="where report.md/report.html go (default: DIR)")
    parser.add_argument("--merge", type=Path, default=None, metavar="OUT",
                        help="instead of a report, write one run directory per experiment under OUT, its "
                        "shards joined (then run neuronlens-report OUT)")
    parser.add_argument("--no-sites", action="store_true",
                        help="do not write each run's neuron viewer and OpenAI-format export")
    return parser.parse_args(argv)


def write_sites(runs) -> None:
    """Each finished run's neuron viewer and OpenAI-format export, where those modules exist."""
    try:
        from neuronlens.report.site import write_site
    except ImportError:
        write_site = None
    try:
        from neuronlens.openai_format import export_run
    except ImportError:
        export_run = None
    for run in runs:
        if not run.finished:
            continue
        if write_site is not None:
            write_site(run.path)
        if export_run is not None:
            export_run(run.path)


def report(args: argparse.Namespace) -> None:
    from neuronlens.report.runs import load_runs, merge

    if not args.dir.exists():
        raise UserError(f"{args.dir} does not exist; give a run or multirun directory.")
    root = args.dir.resolve()
    if args.merge is not None:
        for exp, target in merge(root, args.merge):
            print(f"{target}: {len(exp.rows)} neurons from {len(exp.runs)} run(s)")
        print(f"Now: neuronlens-report {args.merge}")
        return
    runs = load_runs(root)
    if not args.no_sites:
        write_sites(runs)
    from neuronlens.report.build import build
    from neuronlens.report.render import write

    out_dir = (args.out or root).resolve()
    md, page = write(build(root, runs, out_dir), out_dir)
    print(f"{md}\n{page}")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    fail_cleanly(lambda: report(args))
