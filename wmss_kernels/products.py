"""The cuBLAS matrix products of the launchers, with float32 accumulation whatever the operands.

On CUDA, cuBLAS multiplies bf16/fp16 operands with a float32 accumulator and writes float32 (or
rounds once to the output's dtype) through ``torch.mm``/``torch.addmm(..., out_dtype=)``
(PyTorch >= 2.8). Elsewhere (Triton's CPU interpreter, in the tests) low-precision operands are
upcast to float32 first, which computes the same thing.
"""

from __future__ import annotations

import torch

# torch.mm / torch.addmm(..., out_dtype=): low-precision operands, float32 output.
_HAS_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out") and hasattr(torch.ops.aten.mm,
                                                                         "dtype_out")


def _native_out_dtype(a: torch.Tensor, out: torch.Tensor) -> bool:
    return a.is_cuda and _HAS_OUT_DTYPE and out.dtype == torch.float32


def float32_output_is_free(device: torch.device) -> bool:
    """Whether a float32 product of low-precision operands costs no operand copies on
    ``device``: on CUDA only with ``out_dtype=`` (PyTorch >= 2.8); elsewhere the operands are
    upcast anyway (the interpreter's CPU tensors)."""
    return device.type != "cuda" or _HAS_OUT_DTYPE


def accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       alpha: float = 1.0) -> None:
    """``acc += alpha * a @ b``; ``acc`` float32, ``a`` and ``b`` in one model's dtype.

    On CUDA the float32 ``acc`` is cuBLAS's own accumulator: no rounded intermediate, no extra
    pass over ``acc``.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
    elif _native_out_dtype(a, acc):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, alpha=alpha, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), alpha=alpha)


def write_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``out = alpha * a @ b`` in ``out``'s dtype (the operands' dtype or float32), accumulated in
    float32 and rounded once."""
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, beta=0, alpha=alpha, out=out)
    elif _native_out_dtype(a, out):
        torch.addmm(out, a, b, beta=0, alpha=alpha, out_dtype=out.dtype, out=out)
    else:
        torch.addmm(out, a.to(out.dtype), b.to(out.dtype), beta=0, alpha=alpha, out=out)
