"""Training steps of the fused loss for a profiler: warm-up steps, then one profiled step.

``python -m benchmarks.profile_step [--shape qwen3-4b] [--tokens 4096] [--dtype bfloat16]``

The step is the benchmark's ``full`` step (forward and backward of ``wmss.fused_loss`` on the
inputs ``wmss bench`` draws) on the provider of the default backend (``wmss_triton`` on CUDA).
The warm-up steps compile the kernels first; the last step runs between ``cudaProfilerStart``
and ``cudaProfilerStop`` (``torch.cuda.profiler``), so a profiler started with collection off
sees one step's kernels and no compilation, for example Nsight Compute:

    ncu --profile-from-start off --launch-count 12 python -m benchmarks.profile_step

Not an NVTX range: NVTX push/pop ranges belong to the thread that opens them, and autograd
launches the backward's kernels from its own device thread.

On a CPU (``--device cpu``) nothing is profiled: the steps run and are timed, which checks the
options and the step on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Optional, Sequence

import torch

from .inputs import make_inputs
from .providers import PROVIDERS, Problem, default_wmss
from .shapes import ALL_SHAPES, DTYPES, INPUT_MODES, SEED

WARMUP_STEPS = 2


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3-4b", choices=tuple(ALL_SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    parser.add_argument("--inputs", default="gaussian", choices=INPUT_MODES)
    parser.add_argument("--provider", help="a fused_loss provider (default: the default "
                                           "backend's, wmss_triton on CUDA)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error(f"--tokens must be positive, got {args.tokens}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.provider is not None and (args.provider not in PROVIDERS or
                                      not PROVIDERS[args.provider].implements("fused_loss")):
        names = [name for name, p in PROVIDERS.items() if p.implements("fused_loss")]
        parser.error(f"--provider must be one of {', '.join(names)}, got {args.provider!r}")
    return args


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _profiled(device: torch.device):
    """Profiler collection on around the block (CUDA), from every thread of the process."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.profiler.start()
    try:
        yield
    finally:
        torch.cuda.profiler.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    provider = PROVIDERS[args.provider or default_wmss(device.type)]
    problem = Problem("fused_loss", ALL_SHAPES[args.shape], DTYPES[args.dtype], args.tokens,
                      device, inputs=args.inputs)
    reason = provider.unsupported(problem)
    if reason:
        print(f"profile_step: {provider.name} cannot run here: {reason}", file=sys.stderr)
        return 2
    step = provider.make_step(problem, make_inputs(problem, SEED), "full")
    for index in range(WARMUP_STEPS + 1):
        for leaf in step.grads:
            leaf.grad = None
        profiled = index == WARMUP_STEPS
        _synchronize(device)
        start = time.perf_counter()
        with _profiled(device) if profiled else contextlib.nullcontext():
            step.run()
            _synchronize(device)
        if not profiled:
            label = "warm-up"
        else:
            label = "profiled" if device.type == "cuda" else "last"
        print(f"{provider.name} {args.shape} {args.dtype} N={args.tokens} step {index} ({label}): "
              f"{(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
