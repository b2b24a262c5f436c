"""``neuronlens-report DIR [--out OUTDIR] [--merge OUT] [--neuronpedia OUT]``: compare the runs under
DIR (one run or a whole Hydra multirun) in report.md and report.html, join the shards of each
experiment into one run directory each, or write one run's units as Neuronpedia's upload takes
them."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from neuronlens.cli.main import fail_cleanly
from neuronlens.errors import UserError

log = logging.getLogger("neuronlens.report")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="neuronlens-report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="neuronlens-report: compare neuronlens runs. Writes report.md and report.html "
        "(scores with bootstrap\nintervals, paired tests between explainers and judges, judge power, "
        "plots), and for each finished\nrun its neuron viewer (viewer/index.html) and its "
        "explanations in OpenAI's format (openai/);\nprints every file and folder it writes.",
        epilog="examples:\n"
        "  neuronlens-report outputs/2026-12-01/10-00-00     one run: its report and neuron viewer\n"
        "  neuronlens-report multirun/2026-12-01/10-00-00    a sweep: every run compared\n"
        "  neuronlens-report runs --out reports/today        the report elsewhere\n"
        "  neuronlens-report multirun/X --merge merged       join sharded runs, then report merged\n"
        "  neuronlens-report runs/sae --neuronpedia np --neuronpedia-model smollm2-135m --source-set res-sm")
    parser.add_argument("dir", type=Path, help="a run directory, or a folder of runs (e.g. a Hydra multirun)")
    parser.add_argument("--out", type=Path, default=None, help="where report.md/report.html go (default: DIR)")
    parser.add_argument("--merge", type=Path, default=None, metavar="OUT",
                        help="instead of a report, write one run directory per experiment under OUT, its "
                        "shards joined (then run neuronlens-report OUT)")
    parser.add_argument("--neuronpedia", type=Path, default=None, metavar="OUT",
                        help="instead of a report, write DIR's units (one run) as Neuronpedia's upload "
                        "requests under OUT/<layer>-<source set>/ (nothing is uploaded)")
    parser.add_argument("--neuronpedia-model", default=None, metavar="ID",
                        help="the model's id on Neuronpedia (default: the run's subject name)")
    parser.add_argument("--source-set", default="neuronlens",
                        help="the Neuronpedia source set the units belong to (default: neuronlens)")
    parser.add_argument("--no-sites", action="store_true",
                        help="do not write each run's neuron viewer and OpenAI-format export")
    return parser.parse_args(argv)


def write_sites(runs) -> list[str]:
    """Each finished run's neuron viewer and OpenAI-format export; returns a line per folder."""
    from neuronlens.report.openai_format import export_run
    from neuronlens.report.site import write_site

    lines = []
    for run in runs:
        if not run.finished:
            continue
        index = write_site(run.path)
        exported = export_run(run.path)
        lines += [f"{Path(index).parent}/  (neuron viewer: open index.html)",
                  f"{run.path / 'openai'}/  ({len(exported or [])} neurons in OpenAI's format)"]
    return lines


def report(args: argparse.Namespace) -> None:
    from neuronlens.report.runs import load_runs, merge

    if not args.dir.exists():
        raise UserError(f"{args.dir} does not exist; give a run or multirun directory.")
    root = args.dir.resolve()
    if args.neuronpedia is not None:
        from neuronlens.report.neuronpedia import export

        summary = root / "summary.json"
        if not summary.exists():
            raise UserError(f"{root} is not a finished run (no summary.json); --neuronpedia exports one run.")
        model = args.neuronpedia_model or json.loads(summary.read_text())["subject"]
        written = export(root, args.neuronpedia, model, args.source_set)
        print("Wrote (Neuronpedia upload requests, not sent):\n" + "\n".join(f"  {p}" for p in written))
        return
    if args.merge is not None:
        for exp, target in merge(root, args.merge):
            print(f"{target}: {len(exp.rows)} neurons from {len(exp.runs)} run(s)")
        print(f"Now: neuronlens-report {args.merge}")
        return
    runs = load_runs(root)
    sites = [] if args.no_sites else write_sites(runs)
    from neuronlens.report.build import build
    from neuronlens.report.render import write

    out_dir = (args.out or root).resolve()
    written = write(build(root, runs, out_dir), out_dir)
    print("Wrote:\n" + "\n".join(f"  {line}" for line in [*map(str, written), *sites]))


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    fail_cleanly(lambda: report(args))
