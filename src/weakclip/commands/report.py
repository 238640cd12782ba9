"""``weakclip report WORKDIR``: (re)build ``report.html`` of a finished or partial ``weakclip run``."""

from __future__ import annotations

import argparse
from pathlib import Path

from weakclip.commands import lock_folder


def build(args: argparse.Namespace) -> int:
    from weakclip.report.analysis import analyse
    from weakclip.report.checks import find_regressions
    from weakclip.report.page import build_report

    log = (lambda line: None) if args.quiet else print
    analysis = analyse(args.workdir, log=log)
    path = build_report(args.workdir, log=log, analysis=analysis)
    for warning in find_regressions(analysis):
        print(f"WARNING: {warning}")
    print(f"page: {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="(re)build report.html of a run's work folder (finished or partial)",
        description="Reads the work folder of 'weakclip run' (its stage records, logs and mask folders, and "
                    "the dataset recorded in run.json) and writes WORKDIR/report.html, a page that opens "
                    "from disk: "
                    "stage table, per-class IoU/FP/FN chart, gallery, training curves and regression "
                    "warnings. The figures are also saved in WORKDIR/report/.")
    p.add_argument("workdir", type=Path, help="the --workdir of 'weakclip run' or 'weakclip demo'")
    p.add_argument("--quiet", action="store_true", help="print only the warnings and the page's path")
    p.set_defaults(func=build)
    lock_folder(p, "workdir", existing=True)
