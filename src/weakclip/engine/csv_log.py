"""The training log ``log.csv``: one row per logged iteration, its header kept across resumes."""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["open_csv_log", "truncate_csv"]


def truncate_csv(path: Path, upto_iter: int) -> None:
    """On resume, drop the rows beyond the checkpoint (they will be written again)."""
    if not path.is_file():
        return
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if rows:
        head = [] if rows[0] and rows[0][0].isdigit() else [rows[0]]  # a log that lost its header: none
        keep = head + [r for r in rows[len(head):] if r and r[0].isdigit() and int(r[0]) <= upto_iter]
        with open(path, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(keep)


def open_csv_log(path: Path, header: list[str], resume: bool):
    """``path`` opened for appending rows, its header first: a fresh file on a new run; on a resumed one the
    existing rows are kept and a header is written first when the file is missing, empty, or lost it (a run
    killed before its first row was flushed left an empty file, which the report could not read)."""
    rows: list[list[str]] = []
    if resume and path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r]
    if rows and rows[0] and not rows[0][0].isdigit():  # the header is there: append below it
        fh = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - the caller closes it
        return fh, csv.writer(fh)
    fh = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - the caller closes it
    writer = csv.writer(fh)
    writer.writerows([header, *rows])
    fh.flush()  # the header is on disk before the first row, so a kill leaves a readable log
    return fh, writer
