"""Choosing a backend: ``"auto"`` is Triton on CUDA and chunked PyTorch everywhere else (and for
dtypes the Triton kernels do not support: float64).

An engine provides three operations on flat inputs (hidden ``[N, d]``, weight ``[V, d]``, bias
``[V]``, labels ``[N]``): ``mixed_forward`` and ``mixed_backward`` of the mixed loss, and
``single_forward`` (one model's entropies), and ``pinned()``, the engine with its run-time
configuration fixed (the autograd Function pins at the forward). ``"reference"`` has no engine:
it is the plain formula, differentiated by autograd (see ``wmss.reference``).
"""

from __future__ import annotations

import functools

import torch

from wmss_kernels.config import is_interpreting

from .validation import BACKENDS, check_choice


@functools.lru_cache(maxsize=None)
def _engine(name: str):
    if name == "triton":
        from .triton_backend import TritonEngine

        return TritonEngine()
    from .torch_backend import TorchEngine

    return TorchEngine()


def resolve(backend: str, device: torch.device, dtypes=()) -> str:
    """The concrete backend name for ``backend`` on ``device`` for inputs of ``dtypes`` (pairs
    ``(argument name, dtype)``); raises if it cannot run there."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if device.type != "cuda" or is_interpreting():
            return "torch"
        from .triton_backend import SUPPORTED_DTYPES

        return "triton" if all(dtype in SUPPORTED_DTYPES for _, dtype in dtypes) else "torch"
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and is_interpreting()):
            raise ValueError(f"backend='triton' needs CUDA tensors (got {device}), or CPU tensors "
                             "with TRITON_INTERPRET=1 set before triton is imported")
        from .triton_backend import SUPPORTED_DTYPES

        for name, dtype in dtypes:
            if dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"backend='triton' supports float16, bfloat16 and float32; {name} "
                                 f"is {dtype} (use backend='torch')")
    return backend


def engine(name: str):
    """The engine of a resolved backend name ("triton" or "torch")."""
    if name not in ("triton", "torch"):
        raise ValueError(f"backend {name!r} has no engine")
    return _engine(name)
