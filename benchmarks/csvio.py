"""The results file ``benchmarks/results/<device>.csv``: its columns, rows, and atomic appends.

One row per (kernel, provider, mode, metric, token count): ``metric`` is ``speed`` (unit ms,
p50/p20/p80 over the timed calls) or ``memory`` (unit MB = 2^20 bytes, one measurement, so
p50 = p20 = p80). ``config`` is compact JSON: the head shape, dtype, input mode (``inputs``;
rows written before it existed are ``gaussian``), lam, softcap, widths, vocabulary, library
versions, ``status`` ("ok", or why there is no figure: "unsupported", "mismatch", "oom",
"error", with a ``detail``) and, for a checked provider, ``check``: the correctness check's
token count, rule (``factor``, ``floor``) and each output's relative ``error`` next to the plain
formula's (``plain_error``; null: missing or non-finite). Rows that are not "ok" have empty
figures.
Every run appends; ``timestamp`` (UTC, the run's start) tells runs apart.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20",
           "p80", "config", "device", "timestamp", "version")


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``; ``"cpu"`` stays ``"cpu"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def format_number(x) -> str:
    return "" if x is None else f"{x:.6g}"


def read_rows(path: Path) -> list[dict]:
    """All rows of a results file (``[]`` if it does not exist), as dicts of strings."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not {list(COLUMNS)}")
        return list(reader)


def append_rows(path: Path, rows: Iterable[dict]) -> int:
    """Append ``rows`` to ``path`` atomically (existing rows + new ones to a temporary file in the
    same folder, then ``os.replace``): an interrupted run never leaves a truncated file."""
    path = Path(path)
    rows = list(rows)
    if not rows:
        return 0
    existing = read_rows(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(existing)
    writer.writerows({k: row[k] for k in COLUMNS} for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(rows)


def config_of(row: dict) -> dict:
    return json.loads(row["config"]) if row.get("config") else {}


def inputs_of(config: dict) -> str:
    """The row's input mode; rows from before the modes existed were Gaussian."""
    return config.get("inputs", "gaussian")


def figure(row: dict, column: str = "p50"):
    """A row's number as a float, or None for rows without figures."""
    value = row.get(column, "")
    return float(value) if value not in ("", None) else None


def latest_rows(rows: list[dict]) -> list[dict]:
    """The rows of the latest run of each (kernel, provider, shape, dtype, inputs): reruns of one
    provider, shape or input mode replace only those figures."""
    def group(row):
        cfg = config_of(row)
        return row["kernel"], row["provider"], cfg.get("shape"), cfg.get("dtype"), inputs_of(cfg)

    newest: dict = {}
    for row in rows:
        key = group(row)
        newest[key] = max(newest.get(key, ""), row["timestamp"])
    return [row for row in rows if row["timestamp"] == newest[group(row)]]
