"""Argument checking for the public functions: every error names the argument at fault.

Bad input must fail here, with a ``ValueError`` or ``TypeError`` a user can act on, and never as a
NaN, a hang or a crash deep inside a kernel.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny

# The label-range check costs one host-device synchronisation per call on CUDA; set this
# environment variable to 1 to skip it (out-of-range labels then give undefined losses).
SKIP_LABEL_CHECK_ENV = "WMSS_SKIP_LABEL_CHECK"


@dataclass(frozen=True)
class MixedLossSpec:
    """The validated scalar options of the mixed loss, handed to every backend."""

    lam: float
    softcap: Optional[float]
    gap_threshold: Optional[float]
    ignore_index: int


def _real(name: str, value, *, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    return float(value)


def check_lam(lam) -> float:
    lam = _real("lam", lam)
    if not math.isfinite(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be a finite number in [0, 1], got {lam}")
    return lam


def check_softcap(softcap) -> Optional[float]:
    softcap = _real("softcap", softcap, allow_none=True)
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite positive number or None, got {softcap}")
    if softcap is not None and not FLOAT32_TINY <= softcap <= FLOAT32_MAX:
        raise ValueError(f"softcap must be between {FLOAT32_TINY:.4g} and {FLOAT32_MAX:.4g} "
                         f"(float32's range: the cap is applied in float32), got {softcap}")
    return softcap


def check_gap_threshold(gap_threshold) -> Optional[float]:
    gap_threshold = _real("gap_threshold", gap_threshold, allow_none=True)
    if gap_threshold is not None and math.isnan(gap_threshold):
        raise ValueError("gap_threshold must be a number or None, got nan")
    return gap_threshold


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def check_choice(name: str, value, choices: tuple) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_num_items(num_items_in_batch, reduction: str):
    """``num_items_in_batch``: None, a non-negative int, or a one-element integer/float tensor."""
    if num_items_in_batch is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch replaces the denominator of reduction='mean'; "
                         f"it cannot be combined with reduction={reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.is_complex():
            raise ValueError("num_items_in_batch must be a number or a one-element tensor, got a "
                             f"tensor of shape {tuple(num_items_in_batch.shape)}")
        return num_items_in_batch
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError("num_items_in_batch must be a number, a one-element tensor or None, got "
                        f"{type(num_items_in_batch).__name__}")
    if not math.isfinite(num_items_in_batch) or num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be finite and >= 0, got {num_items_in_batch}")
    return num_items_in_batch


def check_tensor(name: str, value, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or "
                        f"float64), got {value.dtype}")
    return value


def check_head(prefix: str, hidden, weight, bias) -> None:
    """One model's hidden states ``(..., d)``, lm-head weight ``(V, d)`` and optional bias ``(V,)``.

    ``prefix`` is prepended to the argument names in messages ("strong_", "weak_" or "").
    """
    check_tensor(f"{prefix}hidden", hidden)
    check_tensor(f"{prefix}weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden must have at least one dimension (..., d)")
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be 2-D (V, d), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}weight has hidden size {weight.shape[1]} but {prefix}hidden "
                         f"has {hidden.shape[-1]} (shapes {tuple(weight.shape)} and "
                         f"{tuple(hidden.shape)})")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight has an empty vocabulary")
    if bias is not None:
        check_tensor(f"{prefix}bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must have shape ({weight.shape[0]},) to match "
                             f"{prefix}weight, got {tuple(bias.shape)}")


def check_same_device(named: dict) -> torch.device:
    devices = {name: t.device for name, t in named.items() if t is not None}
    first_name, device = next(iter(devices.items()))
    for name, other in devices.items():
        if other != device:
            raise ValueError(f"{name} is on {other} but {first_name} is on {device}; all inputs "
                             "must be on one device")
    return device


def check_pair_dtypes(prefix: str, hidden, weight, bias) -> None:
    """Outside autocast, as for ``torch.nn.functional.linear``, a model's tensors share a dtype."""
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{prefix}hidden is {hidden.dtype} but {prefix}weight is "
                         f"{weight.dtype}; pass matching dtypes or run under torch.autocast")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"{prefix}bias is {bias.dtype} but {prefix}weight is {weight.dtype}")


def check_labels(labels, leading_shape: torch.Size, vocab: int, ignore_index: int,
                 name: str = "labels") -> torch.Tensor:
    """Integer labels shaped like the hidden states without their last dimension, in ``[0, V)``."""
    check_tensor(name, labels, floating=False)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(f"{name} has shape {tuple(labels.shape)} but the hidden states have "
                         f"leading shape {tuple(leading_shape)}; labels are aligned with the "
                         "hidden states (no shift inside)")
    labels = labels.long()
    if labels.numel() and os.environ.get(SKIP_LABEL_CHECK_ENV, "0") in ("", "0"):
        out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(out_of_range.any()):
            bad = labels[out_of_range][:5].tolist()
            raise ValueError(f"{name} must lie in [0, {vocab}) or equal ignore_index="
                             f"{ignore_index}; found {bad}")
    return labels
