"""The sweep behind ``wmss bench``: check each provider, then time it, and write the CSV rows.

For every kernel, head shape, dtype and provider (in that order, so ``torch.compile`` compiles
once per group): if the provider cannot run here, one ``unsupported`` row per mode says why;
otherwise its result is checked against the float64 truth on ``CHECK_TOKENS`` tokens, and a
provider that disagrees gets ``mismatch`` rows and is not timed. Then each token count and mode
is measured (warm-up, peak memory, time). A provider that runs out of memory at some token count
gets an ``oom`` row and is not tried at larger ones. Rows are appended to the CSV after every
group, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

import wmss

from . import csvio
from .check import check
from .measure import Measurement, free_memory, measure
from .providers import PROVIDERS, Problem, Provider, make_inputs
from .shapes import (
    ALL_SHAPES,
    CHECK_TOKENS,
    DTYPES,
    GPU_SHAPES,
    GPU_TOKENS,
    KERNEL_MODES,
    LAM,
    NOT_BY_DEFAULT,
    QUICK_DTYPES,
    QUICK_SHAPES,
    QUICK_TOKENS,
    SEED,
    HeadShape,
)

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
DEFAULT_OUT = PACKAGE_DIR / "results"


class UsageError(ValueError):
    """A bad command-line choice; the message says what to choose from."""


@dataclass(frozen=True)
class Options:
    kernels: tuple[str, ...]
    providers: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[str, ...]
    tokens: Optional[tuple[int, ...]]  # None: the default sweep of each dtype
    modes: Optional[tuple[str, ...]]  # None: every mode of each kernel
    device: torch.device
    out: Path
    quick: bool
    plot: bool = True

    def token_sweep(self, dtype_name: str) -> tuple[int, ...]:
        if self.tokens:
            return self.tokens
        return QUICK_TOKENS if self.quick else GPU_TOKENS[dtype_name]


def _names(values, choices, what: str, default) -> tuple:
    """Split comma-separated command-line values and check them against ``choices``."""
    if not values:
        return tuple(default)
    names = tuple(v for value in values for v in str(value).split(",") if v)
    for name in names:
        if name not in choices:
            raise UsageError(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
    return names


def resolve_options(args) -> Options:
    """``Options`` from the parsed ``wmss bench`` arguments (see ``wmss/commands/bench.py``)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if device.type == "cpu" and not args.quick and not args.shapes:
        raise UsageError("the full sweep runs real lm-head shapes (up to 262144 x 4096) and "
                         "needs a GPU; on a CPU use --quick, or name --shapes and --tokens")
    all_modes = tuple(dict.fromkeys(m for modes in KERNEL_MODES.values() for m in modes))
    shapes_default = QUICK_SHAPES if args.quick else GPU_SHAPES
    tokens = tuple(args.tokens) if args.tokens else None
    if tokens and min(tokens) < 1:
        raise UsageError("--tokens must be positive")
    return Options(
        kernels=_names(args.kernels, tuple(KERNEL_MODES), "kernel", KERNEL_MODES),
        providers=_names(args.providers, tuple(PROVIDERS), "provider",
                         [p for p in PROVIDERS if p not in NOT_BY_DEFAULT[device.type]]),
        dtypes=_names(args.dtypes, tuple(DTYPES), "dtype", QUICK_DTYPES if args.quick else DTYPES),
        shapes=_names(args.shapes, tuple(ALL_SHAPES), "shape", shapes_default),
        tokens=tokens,
        modes=_names(args.modes, all_modes, "mode", ()) or None,
        device=device,
        out=Path(args.out) if args.out else DEFAULT_OUT,
        quick=bool(args.quick),
        plot=not args.no_plot,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return csvio.device_slug(torch.cuda.get_device_name(device))
    return "cpu"


def version_string() -> str:
    """``wmss.__version__`` plus the checkout's short commit (``.dirty`` with local changes)."""
    try:
        def git(*argv):
            return subprocess.run(["git", "-C", str(REPO_ROOT), *argv], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()

        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return wmss.__version__
    return f"{wmss.__version__}+g{sha}" + (".dirty" if dirty else "")


class Recorder:
    """Builds CSV rows with the run's device, timestamp and version."""

    def __init__(self, device: torch.device):
        self.device = device_name(device)
        self.timestamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.version = version_string()

    def _row(self, kernel, provider: Provider, mode, metric, x, figures, config) -> dict:
        p50, p20, p80 = figures if figures else (None, None, None)
        return dict(kernel=kernel, provider=provider.name, mode=mode, metric=metric,
                    unit="ms" if metric == "speed" else "MB", x_name="tokens",
                    x_value="" if x is None else str(x), p50=csvio.format_number(p50),
                    p20=csvio.format_number(p20), p80=csvio.format_number(p80),
                    config=config, device=self.device, timestamp=self.timestamp,
                    version=self.version)

    @staticmethod
    def config(problem: Problem, provider: Provider, status: str, detail: str = "") -> str:
        shape = problem.shape
        cfg = {"shape": shape.name, "dtype": str(problem.dtype).removeprefix("torch."),
               "lam": problem.lam, "softcap": shape.softcap, "d_s": shape.d_strong,
               "d_w": shape.d_weak, "V": shape.vocab, "torch": torch.__version__}
        if provider.package is not None:
            cfg[provider.package] = provider.package_version()
        if problem.device.type == "cpu":
            cfg["threads"] = torch.get_num_threads()
        cfg["status"] = status
        if detail:
            cfg["detail"] = detail
        return json.dumps(cfg, separators=(",", ":"))

    def measured(self, problem: Problem, provider: Provider, mode: str,
                 m: Measurement) -> list[dict]:
        config = self.config(problem, provider, "ok")
        rows = [self._row(problem.kernel, provider, mode, "speed", problem.tokens, m.ms, config)]
        if m.mb is not None:
            rows.append(self._row(problem.kernel, provider, mode, "memory", problem.tokens,
                                  (m.mb,) * 3, config))
        return rows

    def status(self, problem: Problem, provider: Provider, modes, status: str, detail: str,
               x: Optional[int]) -> list[dict]:
        """Rows without figures saying why (``x`` None: the whole token sweep)."""
        config = self.config(problem, provider, status, detail)
        return [self._row(problem.kernel, provider, mode, "speed", x, None, config)
                for mode in modes]


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError))


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:300]


def run_group(provider: Provider, kernel: str, shape: HeadShape, dtype: torch.dtype,
              tokens: tuple[int, ...], modes: tuple[str, ...], device: torch.device,
              recorder: Recorder, log: Callable[[str], None]) -> list[dict]:
    """Check, then measure, one provider on one (kernel, shape, dtype) over the token sweep."""
    start = time.perf_counter()
    rows = _run_group(provider, kernel, shape, dtype, tokens, modes, device, recorder, log)
    if rows and csvio.config_of(rows[0]).get("status") != "unsupported":
        log(f"{kernel} {shape.name} {str(dtype).removeprefix('torch.')} {provider.name}: "
            f"{time.perf_counter() - start:.1f} s")
    return rows


def _run_group(provider, kernel, shape, dtype, tokens, modes, device, recorder, log):
    """``run_group`` without the timing line."""
    base = Problem(kernel, shape, dtype, CHECK_TOKENS[device.type], device, LAM)
    name = f"{kernel} {shape.name} {str(dtype).removeprefix('torch.')} {provider.name}"
    reason = provider.unsupported(base)
    if reason:
        log(f"{name}: not run ({reason})")
        return recorder.status(base, provider, modes, "unsupported", reason, None)

    if not provider.checked:
        log(f"{name}: computes no loss, nothing to check")
    else:
        inputs = None
        try:
            inputs = make_inputs(base, SEED)
            result = check(provider, base, inputs)
        except Exception as error:  # a provider that cannot even run is reported, not fatal
            status = "oom" if _is_oom(error) else "error"
            detail = f"check at {base.tokens} tokens: {_describe(error)}"
            log(f"{name}: {detail}; not timed")
            return recorder.status(base, provider, modes, status, detail, None)
        finally:
            del inputs
            free_memory(device)
        log(f"{name}: check at {base.tokens} tokens {result.summary()}")
        if not result.ok:
            return recorder.status(base, provider, modes, "mismatch",
                                   f"check at {base.tokens} tokens: {result.summary()}", None)

    rows: list[dict] = []
    out_of_memory: dict[str, int] = {}  # mode -> token count that ran out of memory
    for n in tokens:
        problem = replace(base, tokens=n)
        inputs = None
        try:
            inputs = make_inputs(problem, SEED)
            for mode in modes:
                if mode in out_of_memory:
                    continue
                step = None
                try:
                    step = provider.make_step(problem, inputs, mode)
                    m = measure(step, device, provider.measures_memory)
                except Exception as error:
                    status = "oom" if _is_oom(error) else "error"
                    if status == "oom":
                        out_of_memory[mode] = n
                    log(f"{name} {mode:<8} N={n:>6}: {status} ({_describe(error)})")
                    rows += recorder.status(problem, provider, (mode,), status, _describe(error), n)
                    continue
                finally:
                    del step
                    free_memory(device)
                memory = "" if m.mb is None else f"  {m.mb:10.1f} MB"
                log(f"{name} {mode:<8} N={n:>6}: {m.ms[0]:10.3f} ms "
                    f"[p20 {m.ms[1]:.3f}, p80 {m.ms[2]:.3f}]{memory}")
                rows += recorder.measured(problem, provider, mode, m)
        except Exception as error:  # making the inputs themselves failed
            status = "oom" if _is_oom(error) else "error"
            log(f"{name} N={n}: inputs failed ({_describe(error)})")
            rows += recorder.status(problem, provider, modes, status, _describe(error), n)
            break
        finally:
            del inputs
            free_memory(device)
        if len(out_of_memory) == len(modes):
            log(f"{name}: out of memory in every mode; larger token counts skipped")
            break
    return rows


def sweep(options: Options, recorder: Recorder, sink: Callable[[list[dict]], object],
          providers: Optional[dict] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run every group of ``options``; each group's rows go to ``sink`` as soon as they exist."""
    providers = PROVIDERS if providers is None else providers
    torch.manual_seed(SEED)
    all_rows = []
    for kernel in options.kernels:
        modes = tuple(m for m in KERNEL_MODES[kernel]
                      if options.modes is None or m in options.modes)
        if not modes:
            continue
        for shape_name in options.shapes:
            for dtype_name in options.dtypes:
                for provider_name in options.providers:
                    provider = providers[provider_name]
                    if not provider.implements(kernel):
                        continue
                    rows = run_group(provider, kernel, ALL_SHAPES[shape_name], DTYPES[dtype_name],
                                     options.token_sweep(dtype_name), modes, options.device,
                                     recorder, log)
                    sink(rows)
                    all_rows += rows
    return all_rows


def failed_wmss(rows: list[dict]) -> list[str]:
    """wmss's own providers that disagreed with the truth or crashed (a bug in wmss)."""
    bad = set()
    for row in rows:
        status = csvio.config_of(row).get("status")
        if row["provider"].startswith("wmss") and status in ("mismatch", "error"):
            bad.add(row["provider"])
    return sorted(bad)


def main(args) -> int:
    """``wmss bench``: the sweep, the CSV, the markdown report and the plots."""
    from . import plot, report

    try:
        options = resolve_options(args)
    except UsageError as error:
        print(f"wmss bench: {error}", file=sys.stderr)
        return 2
    recorder = Recorder(options.device)
    csv_path = options.out / f"{recorder.device}.csv"
    print(f"wmss bench on {recorder.device} (wmss {recorder.version}, torch {torch.__version__}); "
          f"results appended to {csv_path}")
    if options.device.type == "cpu":
        print("CPU figures: tiny shapes, perf_counter timings, resident-set memory; they check the "
              "harness and compare formulas on a CPU, not GPU performance.")
    start = time.perf_counter()
    rows = sweep(options, recorder, sink=lambda group: csvio.append_rows(csv_path, group))
    report_path = report.write_report(csv_path)
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.1f} s -> {csv_path}")
    print(f"report: {report_path}")
    if options.plot:
        try:
            import matplotlib  # noqa: F401 - the plots' only extra dependency
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        else:
            for path in plot.plot_results(csv_path):
                print(f"plot: {path}")
    print()
    print(report.summary_markdown(csvio.read_rows(csv_path)))
    bad = failed_wmss(rows)
    if bad:
        print(f"wmss bench: {', '.join(bad)} disagreed with the truth or failed", file=sys.stderr)
        return 1
    return 0
