"""Command line: ``python -m moe_lite run <name|all> --size smoke|quick|full --out results/``,
``python -m moe_lite report results/ --out docs/results.md``, ``python -m moe_lite list``.

Each experiment writes ``<out>/<name>.json`` (every metric, the config and the wall time) and
``<out>/<name>.html`` (a self-contained report with its plotly figures).

A user mistake (a bad argument, environment size, device, seed, input file or output path) is
reported as one line on stderr with exit code 2, before any training.

This is an edge: it resolves the :class:`~moe_lite.settings.Settings` once (arguments, else the
environment) and passes them down.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .experiments import EXPERIMENTS, run_experiments
from .experiments.core import UsageError
from .experiments.costs import size_costs
from .experiments.report import write_report
from .experiments.runner import check_device
from .settings import DATA_CHOICES, SIZES, Settings


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as a :class:`UsageError` (one line) instead of usage + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m moe_lite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one experiment, several, or all")
    run.add_argument("names", nargs="+", metavar="NAME", help=f"experiment name(s) or 'all': {', '.join(EXPERIMENTS)}")
    run.add_argument("--size", choices=SIZES, default=None,
                     help="smoke (seconds, CI), quick (minutes on a 2-core CPU), gpu (minutes on a free Colab "
                          "T4; the default on CUDA), full (a paper-style study on a datacenter GPU); "
                          "default: $MOE_LITE_SIZE, else gpu on CUDA, else quick")
    run.add_argument("--out", default="results", help="output folder (default: results/)")
    run.add_argument("--data", choices=DATA_CHOICES, default=None,
                     help="'auto' (the default, or $MOE_LITE_DATA): the size's data, the committed subset at smoke "
                          "and quick size (as the published results), the best full copy at gpu and full; "
                          "'embedded' forces the subset, 'full' a full copy (see moe_lite.data)")
    run.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the size's seeds)")
    run.add_argument("--device", default=None, help="auto (the default), cpu, cuda, cuda:N, mps")
    run.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    run.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                     help="only these variants of each experiment (see 'list'); quote names with spaces")

    sub.add_parser("list", help="list the experiments")

    costs = sub.add_parser("costs", help="what one model of each experiment costs to train at a size "
                                         "(FLOPs, memory; the estimates the sizes are calibrated from)")
    costs.add_argument("--size", choices=SIZES, default=None,
                       help="default: $MOE_LITE_SIZE, else gpu on CUDA, else quick")

    report = sub.add_parser("report", help="a markdown results page from the JSON files of 'run'")
    report.add_argument("folder", nargs="?", default="results", help="where 'run' wrote its JSON files")
    report.add_argument("--out", default=None, help="write the page here (default: print it)")
    report.add_argument("--intro", default=None, help="a markdown file to put above the tables (the findings)")
    report.add_argument("--figures", default=None, metavar="DIR",
                        help="draw each experiment's summary figures into DIR and link them (needs kaleido "
                             "for svg/png)")
    report.add_argument("--figure-format", choices=("svg", "png", "html"), default="svg")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit code (2, with one line on stderr, for a user mistake)."""
    try:
        return _main(argv)
    except UsageError as err:
        print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        return 2


def _settings(size: Optional[str] = None, device: Optional[str] = None, data: Optional[str] = None) -> Settings:
    """The one :meth:`Settings.resolve` of this process; a bad value (argument or environment) is a
    :class:`UsageError`."""
    try:
        return Settings.resolve(size=size, device=None if device == "auto" else device, data=data)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _main(argv: Optional[List[str]]) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "report":
        text = write_report(args.folder, args.out, intro=args.intro, figures=args.figures,
                            figure_format=args.figure_format)
        if args.out is None:
            print(text)
        return 0
    if args.command == "costs":
        rows = size_costs(_settings(size=args.size).size)
        columns = list(rows[0])
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns))
        return 0
    if args.command == "list":
        for name, exp in EXPERIMENTS.items():
            print(f"{name:10s} {exp.description}")
            print(f"{'':10s}   variants: {' | '.join(exp.variants)}")
        return 0
    names = list(EXPERIMENTS) if args.names == ["all"] else args.names
    settings = _settings(args.size, args.device, args.data)
    check_device(settings.device)  # e.g. cuda where there is none: a usage error, before any work
    # run_experiments checks every other argument and the output folder before any training
    run_experiments(names, out=args.out, seeds=args.seeds, progress=not args.no_progress,
                    variants=args.variants, settings=settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
