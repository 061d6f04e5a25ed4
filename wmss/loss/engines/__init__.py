"""The engines behind ``backend=``, and how ``"auto"`` chooses among them.

* ``"triton"``: the fused Triton kernels of ``wmss_kernels`` (CUDA, or CPU under
  ``TRITON_INTERPRET=1``); float16, bfloat16 and float32.
* ``"torch"``: the same algorithm in chunked PyTorch, on any device and dtype.
* ``"reference"``: the plain formula with materialised logits (tests and debugging).
* ``"auto"``: Triton on CUDA, chunked PyTorch everywhere else and for dtypes the Triton kernels
  do not support (float64).

Every engine implements ``contract.Engine``; ``engine(name)`` returns the shared instance.
"""

from __future__ import annotations

import functools

import torch

from wmss_kernels.config import is_interpreting

from ...validation import check_choice
from .contract import Engine

ENGINES = ("triton", "torch", "reference")
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
    if name == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine()
    raise ValueError(f"backend {name!r} has no engine; choose one of {ENGINES}")


def resolve(backend: str, device: torch.device, dtypes=()) -> str:
    """The concrete backend name for ``backend`` on ``device`` for inputs of ``dtypes`` (pairs
    ``(argument name, dtype)``); raises ``ValueError`` naming the argument if it cannot run there."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if device.type != "cuda" or is_interpreting():
            return "torch"
        supported = engine("triton").supported_dtypes
        return "triton" if all(dtype in supported for _, dtype in dtypes) else "torch"
    if backend == "triton" and device.type != "cuda" and not (
            device.type == "cpu" and is_interpreting()):
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device}), or CPU tensors "
                         "with TRITON_INTERPRET=1 set before triton is imported")
    supported = engine(backend).supported_dtypes
    for name, dtype in dtypes:
        if dtype not in supported:
            names = [str(d).removeprefix("torch.") for d in supported]
            names = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
            raise ValueError(f"backend={backend!r} supports {names}; {name} is {dtype} "
                             "(use backend='torch')")
    return backend
