"""The sweep behind ``wmss bench``: check the providers, then time them, and write the CSV rows.

For every kernel, head shape, dtype and input mode (in that order, so ``torch.compile`` compiles
once per (kernel, shape, dtype)), the providers are taken together as one group. A provider that
cannot run here gets one ``unsupported`` row per mode saying why. The others are judged on
``CHECK_TOKENS`` tokens by one rule (``check.py``: each output's error against float64 next to
the plain formula's error in the input dtype); one that fails gets ``mismatch`` rows stating both
errors and is not timed. Then, at each token count and mode, every remaining provider is measured
on the same inputs (warm-up, peak memory, time): on a GPU one after another, on a CPU with their
timed calls interleaved (``measure.measure_interleaved``). A provider that runs out of memory at
some token count gets an ``oom`` row and is not tried at larger ones. Rows go to the CSV after
the check and after every token count, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
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
from .check import CheckResult, check, reference
from .inputs import make_inputs
from .measure import Measurement, free_memory, measure, measure_interleaved
from .providers import PROVIDERS, Problem, Provider
from .shapes import (
    ALL_SHAPES,
    CHECK_TOKENS,
    DEFAULT_INPUTS,
    DTYPES,
    GPU_SHAPES,
    GPU_TOKENS,
    INPUT_MODES,
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
    inputs: tuple[str, ...] = DEFAULT_INPUTS  # input modes (inputs.py), each a separate sweep

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this harness that ``wmss bench``'s parser (``wmss/commands/bench.py``) may not
    declare yet: ``--inputs``. ``python -m benchmarks`` adds them to that parser."""
    try:
        parser.add_argument("--inputs", nargs="+", metavar="MODE",
                            help=f"{', '.join(INPUT_MODES)}: Gaussian logits, or peaked, "
                                 f"heavy-tailed ones like a trained LM's; each named mode is a "
                                 f"separate sweep (default: {', '.join(DEFAULT_INPUTS)})")
    except argparse.ArgumentError:
        pass  # wmss bench declares it already


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
        # getattr: `wmss bench` gains --inputs in wmss/commands/bench.py; `python -m benchmarks`
        # (benchmarks/__main__.py) adds it to the same parser itself.
        inputs=_names(getattr(args, "inputs", None), INPUT_MODES, "inputs", DEFAULT_INPUTS),
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return csvio.device_slug(torch.cuda.get_device_name(device))
    return "cpu"


# Set where the checkout has no .git (a copy of the working tree on a GPU machine): the version
# recorded instead (benchmarks/gpu_session.sh --prepare writes it from the checkout).
VERSION_VARIABLE = "WMSS_BENCH_VERSION"


def version_string() -> str:
    """``wmss.__version__`` plus the checkout's short commit (``.dirty`` with local changes), or
    ``$WMSS_BENCH_VERSION`` when set."""
    if os.environ.get(VERSION_VARIABLE):
        return os.environ[VERSION_VARIABLE]
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
    def config(problem: Problem, provider: Provider, status: str, detail: str = "",
               check: Optional[CheckResult] = None) -> str:
        """The ``config`` JSON: the point, the versions, the status and, for a checked provider,
        its ``check`` (both errors of every output and the rule, ``CheckResult.config``)."""
        shape = problem.shape
        cfg = {"shape": shape.name, "dtype": str(problem.dtype).removeprefix("torch."),
               "inputs": problem.inputs, "lam": problem.lam, "softcap": shape.softcap,
               "d_s": shape.d_strong, "d_w": shape.d_weak, "V": shape.vocab,
               "torch": torch.__version__}
        if provider.package is not None:
            cfg[provider.package] = provider.package_version()
        if problem.device.type == "cpu":
            cfg["threads"] = torch.get_num_threads()
        cfg["status"] = status
        if detail:
            cfg["detail"] = detail
        if check is not None:
            cfg["check"] = check.config()
        return json.dumps(cfg, separators=(",", ":"))

    def measured(self, problem: Problem, provider: Provider, mode: str, m: Measurement,
                 check: Optional[CheckResult] = None) -> list[dict]:
        config = self.config(problem, provider, "ok", check=check)
        rows = [self._row(problem.kernel, provider, mode, "speed", problem.tokens, m.ms, config)]
        if m.mb is not None:
            rows.append(self._row(problem.kernel, provider, mode, "memory", problem.tokens,
                                  (m.mb,) * 3, config))
        return rows

    def status(self, problem: Problem, provider: Provider, modes, status: str, detail: str,
               x: Optional[int], check: Optional[CheckResult] = None) -> list[dict]:
        """Rows without figures saying why (``x`` None: the whole token sweep)."""
        config = self.config(problem, provider, status, detail, check)
        return [self._row(problem.kernel, provider, mode, "speed", x, None, config)
                for mode in modes]


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError))


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:300]


def _failure(error: BaseException) -> str:
    return "oom" if _is_oom(error) else "error"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Group:
    """The providers of one (kernel, shape, dtype, inputs) with what the sweep needs to record:
    rows go to ``sink`` as soon as a stage has them, and are kept for the caller."""

    def __init__(self, base: Problem, modes: tuple[str, ...], recorder: Recorder,
                 log: Callable[[str], None], sink: Optional[Callable[[list[dict]], object]]):
        self.base, self.modes, self.recorder, self.log, self.sink = base, modes, recorder, log, sink
        self.rows: list[dict] = []
        self.checks: dict[str, Optional[CheckResult]] = {}  # provider -> its passed check

    def name(self, provider: Provider) -> str:
        b = self.base
        return f"{b.kernel} {b.shape.name} {_dtype_name(b.dtype)} {b.inputs} {provider.name}"

    def emit(self, rows: list[dict]) -> None:
        self.rows += rows
        if self.sink is not None and rows:
            self.sink(rows)

    def status(self, provider: Provider, status: str, detail: str, modes=None, x=None,
               problem: Optional[Problem] = None, check: Optional[CheckResult] = None) -> list:
        return self.recorder.status(problem or self.base, provider, modes or self.modes, status,
                                    detail, x, check)


def run_group(providers: list[Provider], kernel: str, shape: HeadShape, dtype: torch.dtype,
              tokens: tuple[int, ...], modes: tuple[str, ...], device: torch.device,
              recorder: Recorder, log: Callable[[str], None], inputs: str = DEFAULT_INPUTS[0],
              sink: Optional[Callable[[list[dict]], object]] = None) -> list[dict]:
    """Check, then measure, ``providers`` on one (kernel, shape, dtype, inputs) over the token
    sweep; returns every row (each also given to ``sink`` as soon as it exists)."""
    start = time.perf_counter()
    base = Problem(kernel, shape, dtype, CHECK_TOKENS[device.type], device, LAM, inputs)
    group = _Group(base, modes, recorder, log, sink)
    runnable = _supported(providers, group)
    passed = _judged(runnable, group)
    if passed:
        _measure_sweep(passed, group, tokens, device)
        log(f"{kernel} {shape.name} {_dtype_name(dtype)} {inputs}: "
            f"{time.perf_counter() - start:.1f} s")
    return group.rows


def _supported(providers: list[Provider], group: _Group) -> list[Provider]:
    """The providers that can run here; the others get ``unsupported`` rows with the reason."""
    runnable, rows = [], []
    for provider in providers:
        reason = provider.unsupported(group.base)
        if reason:
            group.log(f"{group.name(provider)}: not run ({reason})")
            rows += group.status(provider, "unsupported", reason)
        else:
            runnable.append(provider)
    group.emit(rows)
    return runnable


def _judged(providers: list[Provider], group: _Group) -> list[Provider]:
    """The providers that pass the check or compute nothing to check, in the order given; the
    others get ``mismatch`` (or ``error``, ``oom``) rows."""
    passed = [p for p in providers if not p.checked]
    for provider in passed:
        group.log(f"{group.name(provider)}: computes no loss, nothing to check")
        group.checks[provider.name] = None
    checked = [p for p in providers if p.checked]
    if checked:
        passed += _check_all(checked, group)
    return [p for p in providers if p in passed]


def _check_all(providers: list[Provider], group: _Group) -> list[Provider]:
    """Judge every provider on one set of inputs against one float64 reference (computed once);
    returns those that pass, their results kept in ``group.checks``."""
    base, rows, passed = group.base, [], []
    inputs = None
    try:
        inputs = make_inputs(base, SEED)
        ref = reference(base, inputs)
    except Exception as error:  # no reference: no provider can be judged
        detail = f"check reference at {base.tokens} tokens: {_describe(error)}"
        group.log(f"{base.kernel} {base.shape.name}: {detail}; nothing checked is timed")
        group.emit([row for p in providers for row in group.status(p, _failure(error), detail)])
        inputs = None
        free_memory(base.device)
        return []
    for provider in providers:
        name = group.name(provider)
        try:
            result = check(provider, base, inputs, ref)
        except Exception as error:  # a provider that cannot even run is reported, not fatal
            detail = f"check at {base.tokens} tokens: {_describe(error)}"
            group.log(f"{name}: {detail}; not timed")
            rows += group.status(provider, _failure(error), detail)
            continue
        group.log(f"{name}: check at {base.tokens} tokens {result.summary()}")
        if result.ok:
            group.checks[provider.name] = result
            passed.append(provider)
        else:
            rows += group.status(provider, "mismatch",
                                 f"check at {base.tokens} tokens: {result.summary()}",
                                 check=result)
    inputs = ref = None  # free the check's inputs before the sweep makes its own
    free_memory(base.device)
    group.emit(rows)
    return passed


def _measure_sweep(providers: list[Provider], group: _Group, tokens: tuple[int, ...],
                   device: torch.device) -> None:
    """Every token count and mode, all ``providers`` on the same inputs at each point."""
    out_of_memory: dict[str, set] = {p.name: set() for p in providers}  # provider -> modes
    for n in tokens:
        problem = replace(group.base, tokens=n)
        rows, inputs = [], None
        try:
            inputs = make_inputs(problem, SEED)
            for mode in group.modes:
                active = [p for p in providers if mode not in out_of_memory[p.name]]
                results = _measure_point(active, problem, inputs, mode, device)
                for provider in active:
                    rows += _point_rows(provider, problem, mode, results[provider.name], group,
                                        out_of_memory)
        except Exception as error:  # making the inputs themselves failed
            group.log(f"{group.name(providers[0])} N={n}: inputs failed ({_describe(error)})")
            for provider in providers:
                rows += group.status(provider, _failure(error), _describe(error), x=n,
                                     problem=problem)
            group.emit(rows)
            return
        finally:
            del inputs
            free_memory(device)
        group.emit(rows)
        exhausted = [p for p in providers if len(out_of_memory[p.name]) == len(group.modes)]
        for provider in exhausted:
            group.log(f"{group.name(provider)}: out of memory in every mode; larger token "
                      f"counts skipped")
        providers = [p for p in providers if p not in exhausted]
        if not providers:
            return


def _point_rows(provider: Provider, problem: Problem, mode: str, result, group: _Group,
                out_of_memory: dict) -> list[dict]:
    """The rows of one provider at one point: its figures, or why there are none."""
    name, n = group.name(provider), problem.tokens
    if isinstance(result, Exception):
        status = _failure(result)
        if status == "oom":
            out_of_memory[provider.name].add(mode)
        group.log(f"{name} {mode:<8} N={n:>6}: {status} ({_describe(result)})")
        return group.status(provider, status, _describe(result), modes=(mode,), x=n,
                            problem=problem)
    memory = "" if result.mb is None else f"  {result.mb:10.1f} MB"
    group.log(f"{name} {mode:<8} N={n:>6}: {result.ms[0]:10.3f} ms "
              f"[p20 {result.ms[1]:.3f}, p80 {result.ms[2]:.3f}]{memory}")
    return group.recorder.measured(problem, provider, mode, result,
                                   group.checks.get(provider.name))


def _measure_point(providers: list[Provider], problem: Problem, inputs: dict, mode: str,
                   device: torch.device) -> dict:
    """provider name -> ``Measurement`` (or the exception it raised) at one point and mode.

    GPU: one provider at a time, each step built just before it is measured (a step may hold
    ``[N, V]`` buffers: ``gemm_floor``'s would crowd the others). CPU: all steps built, then
    measured together with their timed calls interleaved.
    """
    results: dict = {}
    if device.type == "cuda":
        for provider in providers:
            step = None
            try:
                step = provider.make_step(problem, inputs, mode)
                results[provider.name] = measure(step, device, provider.measures_memory)
            except Exception as error:
                results[provider.name] = error
            finally:
                del step
                free_memory(device)
        return results
    steps = {}
    for provider in providers:
        try:
            steps[provider.name] = provider.make_step(problem, inputs, mode)
        except Exception as error:
            results[provider.name] = error
    with_memory = {p.name: p.measures_memory for p in providers}
    try:
        results.update(measure_interleaved(steps, with_memory, device))
    finally:
        del steps
        free_memory(device)
    return results


def sweep(options: Options, recorder: Recorder, sink: Callable[[list[dict]], object],
          providers: Optional[dict] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run every group of ``options``; each group's rows go to ``sink`` as soon as they exist."""
    providers = PROVIDERS if providers is None else providers
    torch.manual_seed(SEED)
    all_rows = []
    for kernel in options.kernels:
        modes = tuple(m for m in KERNEL_MODES[kernel]
                      if options.modes is None or m in options.modes)
        chosen = [providers[name] for name in options.providers
                  if providers[name].implements(kernel)]
        if not modes or not chosen:
            continue
        for shape_name in options.shapes:
            for dtype_name in options.dtypes:
                for inputs in options.inputs:
                    all_rows += run_group(chosen, kernel, ALL_SHAPES[shape_name],
                                          DTYPES[dtype_name], options.token_sweep(dtype_name),
                                          modes, options.device, recorder, log, inputs, sink)
    return all_rows


def failed_wmss(rows: list[dict]) -> list[str]:
    """wmss's own providers that failed the correctness rule or crashed (a bug in wmss)."""
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
    print(f"wmss bench on {recorder.device} (wmss {recorder.version}, torch {torch.__version__}, "
          f"inputs {', '.join(options.inputs)}); results appended to {csv_path}")
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
        print(f"wmss bench: {', '.join(bad)} failed the correctness check or crashed",
              file=sys.stderr)
        return 1
    return 0
