"""PNG plots from a results CSV (matplotlib, Agg backend: no display needed).

One figure per (kernel, shape, dtype, inputs): a column per mode, time (p50, with the p20-p80
band) on top and peak memory below, one line per provider against the token count, both axes
logarithmic. Files are ``<device>-<kernel>-<shape>-<dtype>.png`` next to the CSV for Gaussian
inputs (the names of earlier results), ``...-<dtype>-<inputs>.png`` for the other modes. Only the
latest run of each (kernel, provider, shape, dtype, inputs) is drawn.

``python -m benchmarks.plot benchmarks/results/<device>.csv`` redraws them.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Optional

from . import csvio
from .providers import FLOOR, PROVIDERS
from .shapes import KERNEL_MODES

STYLE = {  # provider -> matplotlib line style
    "naive": dict(color="tab:red", marker="o"),
    "torch_compile": dict(color="tab:orange", marker="s"),
    "liger_concat": dict(color="tab:purple", marker="^"),
    "cce_concat": dict(color="tab:brown", marker="v"),
    # A marker too: a run at one token count draws no line, only markers.
    FLOOR: dict(color="black", marker="_", markersize=18, markeredgewidth=2, linestyle="--"),
    "wmss_torch": dict(color="tab:cyan", marker="D"),
    "wmss_native": dict(color="tab:olive", marker="D", linewidth=2.5),
    "wmss_triton": dict(color="tab:blue", marker="D", linewidth=2.5),
    "wmss_triton_cublas": dict(color="tab:green", marker="D"),
    "wmss_stats": dict(color="tab:blue", marker="x", linestyle=":"),
    "wmss_frozen_weak": dict(color="tab:gray", marker="x", linestyle=":"),
}
LEGEND_INCHES = 2.0  # room on the right for the legend
METRICS = (("speed", "time, p50 (ms)"), ("memory", "peak memory above inputs (MB)"))


def _series(rows: list[dict]) -> dict:
    """(kernel, shape, dtype, inputs) -> (mode, metric, provider) -> sorted
    [(x, p50, p20, p80)]."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for row in csvio.latest_rows(rows):
        cfg = csvio.config_of(row)
        if cfg.get("status", "ok") != "ok" or not row["x_value"]:
            continue
        figures = tuple(csvio.figure(row, c) for c in ("p50", "p20", "p80"))
        groups[(row["kernel"], cfg["shape"], cfg["dtype"], csvio.inputs_of(cfg))][
            (row["mode"], row["metric"], row["provider"])].append((int(row["x_value"]), *figures))
    for series in groups.values():
        for points in series.values():
            points.sort()
    return groups


def _inputs_suffix(inputs: str) -> str:
    return "" if inputs == "gaussian" else f"-{inputs}"


def plot_results(csv_path: Path, out_dir: Optional[Path] = None) -> list[Path]:
    """Draw every (kernel, shape, dtype, inputs) of ``csv_path``; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    csv_path = Path(csv_path)
    out_dir = Path(out_dir) if out_dir else csv_path.parent
    rows = csvio.read_rows(csv_path)
    device = rows[0]["device"] if rows else "unknown"
    paths = []
    for (kernel, shape, dtype, inputs), series in sorted(_series(rows).items()):
        modes = [m for m in KERNEL_MODES[kernel] if any(k[0] == m for k in series)]
        width = 4.6 * len(modes) + LEGEND_INCHES
        fig, axes = plt.subplots(len(METRICS), len(modes), figsize=(width, 7.5), squeeze=False)
        for col, mode in enumerate(modes):
            for r, (metric, label) in enumerate(METRICS):
                ax = axes[r][col]
                for provider in PROVIDERS:
                    points = series.get((mode, metric, provider))
                    if not points:
                        continue
                    xs = [p[0] for p in points]
                    ax.plot(xs, [p[1] for p in points], label=provider, **STYLE[provider])
                    if metric == "speed":
                        ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points],
                                        color=STYLE[provider]["color"], alpha=0.15, linewidth=0)
                ax.set_xscale("log", base=2)
                xs = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
                ax.set_xticks(xs, [str(int(x)) for x in xs])
                ax.minorticks_off()
                if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
                    ax.set_yscale("log")
                    # plain numbers on the log axis (matplotlib's default shows 4x10^1)
                    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
                    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
                ax.set_xlabel("tokens")
                ax.set_ylabel(label)
                if r == 0:
                    ax.set_title(mode, fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
        handles: dict = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=9)
        where = "CPU figures" if device == "cpu" else device
        fig.suptitle(f"{kernel}: {shape}, {dtype}, {inputs} inputs ({where})")
        fig.tight_layout(rect=(0, 0, 1 - LEGEND_INCHES / width, 0.96))
        path = out_dir / f"{device}-{kernel}-{shape}-{dtype}{_inputs_suffix(inputs)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder (default: the CSV's)")
    args = parser.parse_args(argv)
    for path in plot_results(args.csv, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
