"""Argument checks shared by every layer: each error names the argument at fault.

Bad input must fail with a ``ValueError`` or ``TypeError`` a user can act on, and never as a NaN,
a hang or a crash deep inside a kernel. The checks of the loss's own options and tensors live
with the loss (``wmss.loss.options``, ``wmss.loss.inputs``).
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

INT64_MIN, INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max


def check_real(name: str, value, *, allow_none: bool = False) -> Optional[float]:
    """``value`` as a float; ``TypeError`` for bools and non-numbers (None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    return float(value)


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 (labels are int64), got {ignore_index}")
    return int(ignore_index)


def limit_text(limit: int) -> str:
    """``limit`` for messages: ``2**63`` reads better than its 19 digits."""
    return f"2**{limit.bit_length() - 1}" if limit > 0 and limit & (limit - 1) == 0 else str(limit)


def check_int(name: str, value, minimum: int, limit: Optional[int] = None) -> int:
    """``value`` as an int in ``[minimum, limit)``; ``TypeError`` for bools and non-integers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if limit is not None and value >= limit:
        raise ValueError(f"{name} must be < {limit_text(limit)}, got {value}")
    return int(value)


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
