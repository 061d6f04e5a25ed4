"""The engines behind ``backend=``, and how ``"auto"`` chooses among them.

* ``"triton"``: the fused Triton kernels of ``wmss_kernels`` (CUDA, or CPU under
  ``TRITON_INTERPRET=1``); float16, bfloat16 and float32.
* ``"torch"``: the same algorithm in chunked PyTorch, on any device and dtype.
* ``"native"``: the same algorithm as a C++ CPU extension (``csrc/``, built on first use; see
  ``native_engine``), any dtype; CPU tensors only.
* ``"reference"``: the plain formula with materialised logits (tests and debugging).
* ``"auto"``: Triton on CUDA (chunked PyTorch for dtypes the Triton kernels do not support:
  float64); on CPUs the native extension when it builds (one warning and chunked PyTorch when
  it cannot; ``WMSS_NATIVE=0`` turns it off), chunked PyTorch on other devices.

Every engine implements ``contract.Engine``; ``engine(name)`` returns the shared instance.
"""

from __future__ import annotations

import functools
import warnings

import torch

from wmss_kernels.config import is_interpreting

from ...validation import check_choice
from .contract import Engine

ENGINES = ("triton", "torch", "native", "reference")
BACKENDS = ("auto", *ENGINES)


@functools.lru_cache(maxsize=None)
def engine(name: str) -> Engine:
    """The engine of a resolved backend name (one of ``ENGINES``)."""
    if name == "triton":
        from .triton_engine import TritonEngine

        return TritonEngine()
    if name == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine()
    if name == "native":
        from .native_engine import NativeEngine

        return NativeEngine()
    if name == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine()
    raise ValueError(f"backend {name!r} has no engine; choose one of {ENGINES}")


def resolve(backend: str, device: torch.device, dtypes=()) -> str:
    """The concrete backend name for ``backend`` on ``device`` for inputs of ``dtypes`` (pairs
    ``(argument name, dtype)``); raises ``ValueError`` naming the argument if it cannot run there."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if device.type == "cpu" and _native_for_auto():
            return "native"
        if device.type != "cuda" or is_interpreting():
            return "torch"
        supported = engine("triton").supported_dtypes
        return "triton" if all(dtype in supported for _, dtype in dtypes) else "torch"
    if backend == "triton" and device.type != "cuda" and not (
            device.type == "cpu" and is_interpreting()):
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device}), or CPU tensors "
                         "with TRITON_INTERPRET=1 set before triton is imported")
    if backend == "native":
        from . import native_engine

        if device.type != "cpu":
            raise ValueError(f"backend='native' needs CPU tensors (got {device}); use "
                             "backend='auto'")
        reason = _native_unavailable()
        if reason:
            raise ValueError(f"backend='native' cannot run: {reason}; use backend='torch'")
    supported = engine(backend).supported_dtypes
    for name, dtype in dtypes:
        if dtype not in supported:
            names = [str(d).removeprefix("torch.") for d in supported]
            names = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
            raise ValueError(f"backend={backend!r} supports {names}; {name} is {dtype} "
                             "(use backend='torch')")
    return backend


_warned_native = False


@torch.compiler.assume_constant_result  # as _native_for_auto
def _native_unavailable() -> str:
    """Why the native engine cannot run here, or "" (a constant of the process)."""
    from . import native_engine

    return native_engine.unavailable_reason() or ""


# Run eagerly while torch.compile traces (a build, a lock and a warning are no graph material);
# the answer is a constant of the process.
@torch.compiler.assume_constant_result
def _native_for_auto() -> bool:
    """Whether ``"auto"`` takes the native engine on a CPU; the first time it cannot be built,
    one warning says why (``WMSS_NATIVE=0`` turns it off silently)."""
    global _warned_native
    from . import native_engine

    if native_engine.disabled():
        return False
    reason = native_engine.unavailable_reason()
    if reason is None:
        return True
    if not _warned_native:
        _warned_native = True
        warnings.warn(f"wmss: the native CPU engine is unavailable ({reason}); backend='auto' "
                      "uses 'torch' on CPUs", RuntimeWarning, stacklevel=3)
    return False
