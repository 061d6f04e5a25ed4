"""Time and peak memory of one ``Step``.

Every call is ``prepare()`` (untimed: e.g. the forward whose backward is measured), ``run()``
(timed) and ``release()``; gradients are reset to None before each call, so nothing accumulates.

GPU time, one provider after another: the loop of ``triton.testing.do_bench`` written out,
because a backward-only call needs a fresh forward before each timed call and ``do_bench`` has no
untimed per-call setup: the L2 cache is flushed (a 256 MB write) before each call, CUDA events
bracket ``run()`` alone, the run is sized from one call (warm-up of ``GPU_WARMUP_MS``, then
``GPU_REP_MS`` of calls but at least ``GPU_MIN_SAMPLES``), and the host synchronises only at the
end. CPU time: ``time.perf_counter`` around ``run()``, the providers of a point interleaved
(``interleaved_order``: A B C A B C ...), so that a burst of machine noise (another process, a
frequency change) falls on all of them alike instead of on whichever was being timed.

Memory: the peak during ``prepare(); run()`` minus what was allocated before (the inputs), so it
counts the forward's saved state, the gradients and every temporary. GPU:
``torch.cuda.max_memory_allocated``. CPU: the growth of the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set before the call
(Linux only, else omitted); rough, since it includes allocator slack.
"""

from __future__ import annotations

import ctypes
import gc
import math
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .providers import Step
from .shapes import (
    CPU_REPEATS,
    CPU_WARMUP_CALLS,
    GPU_MAX_SAMPLES,
    GPU_MIN_SAMPLES,
    GPU_REP_MS,
    GPU_WARMUP_MS,
    L2_FLUSH_BYTES,
    QUANTILES,
)

MB = 2**20  # the CSV's "MB" are MiB


@dataclass(frozen=True)
class Measurement:
    """p50, p20, p80 of the call time in ms; peak memory above the inputs in MB (or None)."""

    ms: tuple[float, float, float]
    mb: Optional[float]


def quantiles(samples: list[float], qs=QUANTILES) -> tuple[float, ...]:
    """Linear-interpolation quantiles (as ``numpy.quantile``'s default)."""
    ordered = sorted(samples)
    out = []
    for q in qs:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return tuple(out)


def _reset_grads(step: Step) -> None:
    for t in step.grads:
        t.grad = None


def free_memory(device: torch.device) -> None:
    """Return everything freed so far to the device (between providers and before a baseline)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def _malloc_trim() -> None:
    # glibc keeps freed heap pages resident; trimming makes the RSS baseline the live data.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- CPU resident-set probes (Linux) ------------------------------------------------------------

def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Set VmHWM to the current VmRSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- one call -----------------------------------------------------------------------------------

def call(step: Step, before_run=None, after_run=None) -> None:
    """``prepare(); [before_run()]; run(); [after_run()]; release()`` with fresh gradients."""
    _reset_grads(step)
    step.prepare()
    try:
        if before_run is not None:
            before_run()
        step.run()
        if after_run is not None:
            after_run()
    finally:
        step.release()
        _reset_grads(step)


def peak_memory_mb(step: Step, device: torch.device) -> Optional[float]:
    """Peak memory of one call above what was allocated before it (the inputs)."""
    _reset_grads(step)
    free_memory(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        peak = []
        call(step, before_run=lambda: torch.cuda.reset_peak_memory_stats(device),
             after_run=lambda: peak.append(_cuda_peak(device)))
        return (peak[0] - base) / MB
    base_kb = _status_kb("VmRSS")
    reset = []
    peak_kb = []
    call(step, before_run=lambda: reset.append(_reset_peak_rss()),
         after_run=lambda: peak_kb.append(_status_kb("VmHWM")))
    if base_kb is None or not reset[0] or peak_kb[0] is None:
        return None
    return max(0, peak_kb[0] - base_kb) * 1024 / MB


def _cuda_peak(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# ---- time ---------------------------------------------------------------------------------------

def time_ms(step: Step, device: torch.device) -> tuple[float, float, float]:
    """(p50, p20, p80) of ``run()`` in ms, this step alone."""
    if device.type == "cuda":
        return _time_cuda(step, device)
    result = time_cpu_interleaved({"step": step})["step"]
    if isinstance(result, Exception):
        raise result
    return result


def _time_cuda(step: Step, device: torch.device) -> tuple[float, float, float]:
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def timed(events):
        start, end = events
        call(step, before_run=lambda: (flush.zero_(), start.record()), after_run=end.record)

    def new_events():
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    first = new_events()
    timed(first)
    torch.cuda.synchronize(device)
    estimate = max(first[0].elapsed_time(first[1]), 1e-3)
    for _ in range(math.ceil(GPU_WARMUP_MS / estimate)):
        timed(new_events())
    count = min(GPU_MAX_SAMPLES, max(GPU_MIN_SAMPLES, math.ceil(GPU_REP_MS / estimate)))
    events = [new_events() for _ in range(count)]
    for pair in events:
        timed(pair)
    torch.cuda.synchronize(device)
    return quantiles([start.elapsed_time(end) for start, end in events])


def _time_cpu_call(step: Step) -> float:
    """One ``call`` with ``run()`` timed by ``perf_counter``, in ms."""
    clock = {}
    call(step, before_run=lambda: clock.update(start=time.perf_counter()),
         after_run=lambda: clock.update(stop=time.perf_counter()))
    return (clock["stop"] - clock["start"]) * 1e3


def interleaved_order(names: list[str], repeats: int) -> list[str]:
    """The CPU timing schedule: every name once per repetition, in the given order
    (``["A", "B"], 2`` -> ``["A", "B", "A", "B"]``)."""
    return [name for _ in range(repeats) for name in names]


def time_cpu_interleaved(steps: dict[str, Step], repeats: int = CPU_REPEATS,
                         warmup: int = CPU_WARMUP_CALLS) -> dict[str, Union[tuple, Exception]]:
    """(p50, p20, p80) in ms of each step's ``run()``, the steps interleaved: ``warmup`` untimed
    rounds, then ``repeats`` timed ones, each round calling every step once, in order.

    A step that raises is left out of later rounds; its entry is the exception.
    """
    samples: dict[str, list[float]] = {name: [] for name in steps}
    failed: dict[str, Exception] = {}
    for name in interleaved_order(list(steps), warmup + repeats):
        if name in failed:
            continue
        try:
            samples[name].append(_time_cpu_call(steps[name]))
        except Exception as error:  # one provider failing must not stop the others' timing
            failed[name] = error
    return {name: failed[name] if name in failed else quantiles(samples[name][warmup:])
            for name in steps}


# ---- a measurement: warm-up, peak memory, time --------------------------------------------------

def _warm_up_and_peak_memory(step: Step, device: torch.device,
                             with_memory: bool) -> Optional[float]:
    """One warm-up call (compilation, autotuning, workspaces), then peak memory (one call)."""
    call(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return peak_memory_mb(step, device) if with_memory else None


def measure(step: Step, device: torch.device, with_memory: bool = True) -> Measurement:
    """One provider alone (the GPU sweep): warm-up call, peak memory, time."""
    mb = _warm_up_and_peak_memory(step, device, with_memory)
    return Measurement(time_ms(step, device), mb)


def measure_interleaved(steps: dict[str, Step], with_memory: dict[str, bool],
                        device: torch.device) -> dict[str, Union[Measurement, Exception]]:
    """Several providers at one point (the CPU sweep): each one's warm-up call and peak memory
    in turn, then their times interleaved (``time_cpu_interleaved``). A provider that raises gets
    the exception as its entry; the others are still measured."""
    results: dict[str, Union[Measurement, Exception]] = {}
    memory: dict[str, Optional[float]] = {}
    for name, step in steps.items():
        try:
            memory[name] = _warm_up_and_peak_memory(step, device, with_memory[name])
        except Exception as error:
            results[name] = error
    times = time_cpu_interleaved({name: steps[name] for name in memory})
    for name, ms in times.items():
        results[name] = ms if isinstance(ms, Exception) else Measurement(ms, memory[name])
    return {name: results[name] for name in steps}
