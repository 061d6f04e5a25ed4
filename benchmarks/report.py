"""Markdown tables from a results CSV: each provider's p50 time and peak memory, and wmss's ratios
against the best peer and against ``gemm_floor``.

``wmss`` in the ratios is the default backend's provider: ``wmss_triton`` when the CSV has
figures for it (a GPU run), else ``wmss_native`` (a CPU run with the native engine), else
``wmss_torch``; ``wmss_triton_cublas`` (the other logit source) has its own column. The targets
table (``shapes.TARGETS``: the GPU issue's) gives each target's ratio at every point and whether
it is met. Every ratio is wmss / other: below 1, wmss is faster (or leaner). The best peer
is the fastest (or leanest) of naive, torch_compile, liger_concat and cce_concat at that point,
named next to the ratio. Points are (kernel, mode, shape, dtype, inputs, tokens): each input
mode (``gaussian``, ``realistic``) is its own row. Only the latest run of each (kernel, provider,
shape, dtype, inputs) is shown. The full report ends with the correctness check of every provider:
its error against float64 beside the plain formula's, so the margin of each verdict is visible.

``python -m benchmarks.report benchmarks/results/<device>.csv`` prints the full report.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Optional

from . import csvio
from .providers import FLOOR, LEAVES, PEERS, PROVIDERS, default_wmss
from .shapes import (
    ALL_SHAPES,
    DTYPES,
    ERROR_FACTOR,
    ERROR_FLOOR,
    INPUT_MODES,
    KERNEL_MODES,
    TARGETS,
    Target,
)

# The mode that answers "what does a training step cost" for each kernel.
HEADLINE_MODE = {"fused_loss": "full", "token_entropy": "forward"}
# Short cell text for rows without figures.
STATUS_TEXT = {"unsupported": "n/a", "mismatch": "mismatch", "oom": "oom", "error": "error"}
# The outputs the correctness check judges, per kernel (the columns of the correctness tables).
CHECKED_OUTPUTS = {"fused_loss": ("loss", *LEAVES), "token_entropy": ("entropy",)}


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 1000 else f"{x:.3g}"


def _order(value, known) -> tuple:
    known = list(known)
    return (known.index(value) if value in known else len(known), str(value))


def _sort_key(point):
    kernel, mode, shape, dtype, inputs, x = point
    return (list(KERNEL_MODES).index(kernel), KERNEL_MODES[kernel].index(mode),
            _order(shape, ALL_SHAPES), dtype, _order(inputs, INPUT_MODES), x)


class Table:
    """The latest figures of one CSV, indexed by point (kernel, mode, shape, dtype, inputs,
    tokens)."""

    def __init__(self, rows: list[dict]):
        rows = csvio.latest_rows(rows)
        self.device = rows[0]["device"] if rows else "unknown"
        self.versions = sorted({r["version"] for r in rows})
        self.timestamps = sorted({r["timestamp"] for r in rows})
        self.ms: dict = {}  # (point, provider) -> p50 ms
        self.mb: dict = {}
        self.status: dict = {}  # (point, provider) or (group, provider) -> status
        self.notes: dict = defaultdict(set)  # (provider, status, detail) -> {"shape dtype"}
        self.points: set = set()
        self.kernel_providers: dict = defaultdict(set)  # kernel -> providers with rows for it
        # (kernel, shape, dtype, inputs, provider) -> (status, the config's "check")
        self.checks: dict = {}
        for row in rows:
            self.kernel_providers[row["kernel"]].add(row["provider"])
            cfg = csvio.config_of(row)
            inputs = csvio.inputs_of(cfg)
            group = (row["kernel"], row["mode"], cfg.get("shape"), cfg.get("dtype"), inputs)
            status, provider = cfg.get("status", "ok"), row["provider"]
            if "check" in cfg:
                self.checks[(row["kernel"], cfg.get("shape"), cfg.get("dtype"), inputs,
                             provider)] = (status, cfg["check"])
            if status != "ok":
                x = int(row["x_value"]) if row["x_value"] else None
                self.status[(group + (x,), provider)] = status
                self.notes[(provider, status, cfg.get("detail", ""))].add(
                    f"{row['kernel']} {cfg.get('shape')} {cfg.get('dtype')} {inputs}")
                if x is not None:
                    self.points.add(group + (x,))
                continue
            point = group + (int(row["x_value"]),)
            self.points.add(point)
            target = self.ms if row["metric"] == "speed" else self.mb
            target[(point, provider)] = csvio.figure(row)
        self.providers = [p for p in PROVIDERS
                          if any(k[1] == p for k in (*self.ms, *self.status))]
        measured = {p for _, p in self.ms}
        self.wmss = next((p for p in ("wmss_triton", "wmss_native") if p in measured),
                         "wmss_torch")
        # The provider "wmss" stands for in the targets: the default backend's on this device.
        self.default_wmss = default_wmss("cpu" if self.device == "cpu" else "cuda")

    def cell(self, point, provider) -> str:
        ms = self.ms.get((point, provider))
        if ms is None:
            status = (self.status.get((point, provider))
                      or self.status.get((point[:5] + (None,), provider)))
            return STATUS_TEXT.get(status, "—")
        mb = self.mb.get((point, provider))
        return f"{_num(ms)} ms" + ("" if mb is None else f" · {_num(mb)} MB")

    def ratios(self, point) -> list[str]:
        """wmss / best peer (time, memory) and wmss / gemm_floor (time)."""
        out = []
        for figures in (self.ms, self.mb):
            mine = figures.get((point, self.wmss))
            peers = {p: figures[(point, p)] for p in PEERS if (point, p) in figures}
            if mine is None or not peers:
                out.append("—")
                continue
            best = min(peers, key=peers.get)
            out.append(f"{mine / peers[best]:.2f}x ({best})" if peers[best] > 0 else "—")
        mine, floor = self.ms.get((point, self.wmss)), self.ms.get((point, FLOOR))
        out.append(f"{mine / floor:.2f}x" if mine is not None and floor else "—")
        return out

    def markdown(self, points) -> str:
        points = sorted(points, key=_sort_key)
        kernels = {p[0] for p in points}
        providers = [p for p in self.providers
                     if any(p in self.kernel_providers[k] for k in kernels)]
        header = ["shape", "dtype", "inputs", "tokens", *providers,
                  f"{self.wmss} / best peer: time", "memory", f"{self.wmss} / {FLOOR}"]
        lines = [_table_row(header), "|" + " --- |" * len(header)]
        for point in points:
            _, _, shape, dtype, inputs, x = point
            cells = [shape, dtype, inputs, str(x), *(self.cell(point, p) for p in providers),
                     *self.ratios(point)]
            lines.append(_table_row(cells))
        return "\n".join(lines)

    def headline_points(self, kernel: str) -> list:
        """Per (shape, dtype): the largest token count at which wmss has a time."""
        mode = HEADLINE_MODE[kernel]
        best: dict = {}
        for point in self.points:
            if point[0] == kernel and point[1] == mode and (point, self.wmss) in self.ms:
                key = point[2:5]  # shape, dtype, inputs
                if key not in best or point[5] > best[key][5]:
                    best[key] = point
        return list(best.values())

    def checks_markdown(self, kernel: str) -> str:
        """One row per checked (shape, dtype, inputs, provider) of ``kernel``: the verdict, the
        worst output's error as a fraction of its limit, and each output's error / plain error."""
        outputs = CHECKED_OUTPUTS[kernel]
        header = ["shape", "dtype", "inputs", "provider", "verdict", "worst / limit", *outputs]
        lines = [_table_row(header), "|" + " --- |" * len(header)]
        keys = sorted((k for k in self.checks if k[0] == kernel),
                      key=lambda k: (_order(k[1], ALL_SHAPES), k[2], _order(k[3], INPUT_MODES),
                                     _order(k[4], PROVIDERS)))
        for key in keys:
            status, check = self.checks[key]
            verdict = "ok" if status == "ok" else STATUS_TEXT.get(status, status)
            cells = [*key[1:], verdict, _worst_fraction(check),
                     *(_error_cell(check, name) for name in outputs)]
            lines.append(_table_row(cells))
        return "\n".join(lines) if keys else ""

    def target_ratio(self, target: Target, point) -> Optional[float]:
        """``target``'s ratio at ``point`` (shape, dtype, inputs, tokens), or None unmeasured."""
        full_point = (target.kernel, target.mode, *point)
        figures = self.ms if target.metric == "speed" else self.mb
        names = {"wmss": self.default_wmss}
        numerator = figures.get((full_point, names.get(target.numerator, target.numerator)))
        if target.denominator == "gradients":
            denominator = gradient_mb(*point[:2], point[3])
        else:
            denominator = figures.get(
                (full_point, names.get(target.denominator, target.denominator)))
        if numerator is None or not denominator:
            return None
        return numerator / denominator

    def targets_markdown(self) -> str:
        """One row per (shape, dtype, inputs, tokens) with any target measured: each target's
        ratio and whether it is met (``shapes.TARGETS``)."""
        header = ["shape", "dtype", "inputs", "tokens",
                  *(f"{name} (≤ {t.limit:g})" for name, t in TARGETS.items())]
        lines = [_table_row(header), "|" + " --- |" * len(header)]
        points = sorted({p[2:] for p in self.points},
                        key=lambda p: (_order(p[0], ALL_SHAPES), p[1], _order(p[2], INPUT_MODES),
                                       p[3]))
        for point in points:
            ratios = [(self.target_ratio(t, point), t.limit) for t in TARGETS.values()]
            if all(r is None for r, _ in ratios):
                continue
            cells = ["—" if r is None else f"{r:.2f} {'met' if r <= limit else 'missed'}"
                     for r, limit in ratios]
            lines.append(_table_row([*point[:3], str(point[3]), *cells]))
        return "\n".join(lines) if len(lines) > 2 else ""

    def notes_markdown(self) -> str:
        lines = []
        for (provider, status, detail), where in sorted(self.notes.items()):
            lines.append(f"- `{provider}` {status} ({', '.join(sorted(where))}): {detail}")
        return "\n".join(lines)


def gradient_mb(shape: str, dtype: str, tokens: int) -> Optional[float]:
    """MB (2^20 bytes) of the four gradients of a ``fused_loss`` step at a point (None for a
    shape this checkout does not define)."""
    head = ALL_SHAPES.get(shape)
    if head is None or dtype not in DTYPES:
        return None
    elements = (tokens + head.vocab) * (head.d_strong + head.d_weak)
    return elements * DTYPES[dtype].itemsize / 2**20


def _table_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _error(check: dict, column: str, name: str) -> float:
    value = check.get(column, {}).get(name, float("inf"))
    return float("inf") if value is None else value  # null: missing or non-finite


def _error_cell(check: dict, name: str) -> str:
    """``provider's error / plain formula's error`` of one output."""
    if name not in check.get("error", {}):
        return "—"
    return f"{_error(check, 'error', name):.1e} / {_error(check, 'plain_error', name):.1e}"


def _worst_fraction(check: dict) -> str:
    """max over outputs of error / (factor * plain + floor): at most 1 passes."""
    factor = check.get("factor", ERROR_FACTOR)
    floor = check.get("floor", ERROR_FLOOR)
    fractions = [_error(check, "error", name) / (factor * _error(check, "plain_error", name)
                                                 + floor)
                 for name in check.get("error", {})]
    return f"{max(fractions):.2f}" if fractions else "—"


def _rule_text() -> str:
    return (f"for the loss and every gradient, or the entropies, the relative error "
            f"`||got - exact|| / ||exact||` against float64 is at most {ERROR_FACTOR:g}x the "
            f"plain formula's (`naive`, computed in the input dtype) plus {ERROR_FLOOR:.0e}")


def _preamble(table: Table) -> str:
    lines = [f"Device: `{table.device}`; wmss {', '.join(table.versions)}; "
             f"runs {table.timestamps[0]} to {table.timestamps[-1]}." if table.timestamps else
             f"Device: `{table.device}`."]
    if table.device == "cpu":
        lines.append("**CPU figures** (`wmss bench --quick`: tiny heads, `perf_counter` medians, "
                     "resident-set growth): they show the harness at work and the formulas' "
                     "relative costs on a CPU, not GPU performance.")
    lines.append(f"Cells: p50 time · peak memory above the inputs (MB = 2^20 bytes). Ratios are "
                 f"`{table.wmss}` / other (below 1: wmss faster or leaner); the best peer is the "
                 f"best of {', '.join(PEERS)} at that point. Inputs: `gaussian` logits or "
                 f"`realistic` (peaked, heavy-tailed, like a trained LM's). `n/a`: provider "
                 f"unsupported there; `mismatch`: failed the correctness rule (an error above "
                 f"{ERROR_FACTOR:g}x the plain formula's; both are in the full report's "
                 f"correctness check), not timed; `oom`: out of memory; `—`: not measured.")
    return "\n\n".join(lines)


def summary_markdown(rows: list[dict]) -> str:
    """The headline tables (a full step of the fused loss; token_entropy's forward) at the
    largest token count of each shape and dtype."""
    table = Table(rows)
    parts = [_preamble(table)]
    for kernel, mode in HEADLINE_MODE.items():
        points = table.headline_points(kernel)
        if points:
            parts.append(f"**{kernel}, {mode}** (largest token count measured)\n\n"
                         + table.markdown(points))
    targets = table.targets_markdown()
    if targets:
        parts.append(f"**Targets** (`{table.default_wmss}`; "
                     f"a ratio at or below its limit is met; `gradients`: the bytes of the four "
                     f"gradients)\n\n" + targets)
    return "\n\n".join(parts)


def full_markdown(rows: list[dict]) -> str:
    """Summary, then every (kernel, mode) at every token count, then the notes."""
    table = Table(rows)
    parts = [f"# wmss benchmarks: {table.device}", summary_markdown(rows), "## All measurements"]
    for kernel, modes in KERNEL_MODES.items():
        for mode in modes:
            points = [p for p in table.points if p[0] == kernel and p[1] == mode]
            if points:
                parts.append(f"### {kernel}, {mode}\n\n" + table.markdown(points))
    checks = [(kernel, table.checks_markdown(kernel)) for kernel in KERNEL_MODES]
    if any(text for _, text in checks):
        parts.append("## Correctness check\n\n"
                     f"Before timing, each provider is judged by one rule: {_rule_text()}. Each "
                     "cell: the provider's error / the plain formula's; `worst / limit`: the "
                     "worst output's error as a fraction of what the rule allows (at most 1 "
                     "passes).")
        parts += [f"### {kernel}\n\n{text}" for kernel, text in checks if text]
    notes = table.notes_markdown()
    if notes:
        parts.append("## Providers without figures\n\n" + notes)
    return "\n\n".join(parts) + "\n"


def write_report(csv_path: Path) -> Path:
    """Write ``<device>.md`` next to the CSV; returns its path."""
    csv_path = Path(csv_path)
    path = csv_path.with_suffix(".md")
    path.write_text(full_markdown(csvio.read_rows(csv_path)))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--summary", action="store_true", help="only the headline tables")
    args = parser.parse_args(argv)
    rows = csvio.read_rows(args.csv)
    print(summary_markdown(rows) if args.summary else full_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
