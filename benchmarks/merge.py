"""Fold results measured elsewhere (a GPU machine's ``$OUT``) into ``benchmarks/results``.

``python -m benchmarks.merge path/to/<device>.csv [...]`` appends each file's rows to the results
CSV of the same name, then rewrites that CSV's markdown report and plots. Rows already present
(same run, same point) are not added twice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import csvio, plot, report
from .run import DEFAULT_OUT


def merge(source: Path, results: Path = DEFAULT_OUT, draw: bool = True) -> Path:
    """Append ``source``'s new rows to ``results/<source name>``; returns the results CSV."""
    source = Path(source)
    target = Path(results) / source.name
    seen = {tuple(row[c] for c in csvio.COLUMNS) for row in csvio.read_rows(target)}
    new = [row for row in csvio.read_rows(source)
           if tuple(row[c] for c in csvio.COLUMNS) not in seen]
    csvio.append_rows(target, new)
    print(f"{source}: {len(new)} new rows -> {target}")
    print(f"report: {report.write_report(target)}")
    if draw:
        for path in plot.plot_results(target):
            print(f"plot: {path}")
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__)
    parser.add_argument("csv", type=Path, nargs="+")
    parser.add_argument("--results", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    for source in args.csv:
        merge(source, args.results, draw=not args.no_plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
