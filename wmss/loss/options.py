"""``LossOptions``: the options of the fused loss, validated once.

``wmss.fused_loss``, ``wmss.FusedWMSSLoss`` and ``wmss.apply_wmss`` take the same options; each
builds one ``LossOptions`` (at the call, at construction, at wrapping), so a bad option fails
there with the same message. ``LossOptions.spec`` is the part every engine sees.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import defaults
from ..validation import check_choice, check_flag, check_ignore_index, check_real
from .engines import BACKENDS
from .engines.contract import MixedLossSpec

REDUCTIONS = ("mean", "sum", "none")
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny


def check_lam(lam) -> float:
    lam = check_real("lam", lam)
    if not math.isfinite(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be a finite number in [0, 1], got {lam}")
    return lam


def check_softcap(softcap) -> Optional[float]:
    softcap = check_real("softcap", softcap, allow_none=True)
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite positive number or None, got {softcap}")
    if softcap is not None and not FLOAT32_TINY <= softcap <= FLOAT32_MAX:
        raise ValueError(f"softcap must be between {FLOAT32_TINY:.4g} and {FLOAT32_MAX:.4g} "
                         f"(float32's range: the cap is applied in float32), got {softcap}")
    return softcap


def check_gap_threshold(gap_threshold) -> Optional[float]:
    gap_threshold = check_real("gap_threshold", gap_threshold, allow_none=True)
    if gap_threshold is not None and math.isnan(gap_threshold):
        raise ValueError("gap_threshold must be a number or None, got nan")
    return gap_threshold


@dataclass(frozen=True)
class LossOptions:
    """The options of ``wmss.fused_loss`` (see it for each one's meaning), checked on creation.

    Raises:
        TypeError, ValueError: naming the option at fault.
    """

    lam: float = defaults.LAMBDA
    ignore_index: int = defaults.IGNORE_INDEX
    reduction: str = "mean"
    softcap: Optional[float] = None
    train_weak: bool = True
    gap_threshold: Optional[float] = None
    return_stats: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        checked = dict(lam=check_lam(self.lam), softcap=check_softcap(self.softcap),
                       gap_threshold=check_gap_threshold(self.gap_threshold),
                       ignore_index=check_ignore_index(self.ignore_index),
                       reduction=check_choice("reduction", self.reduction, REDUCTIONS),
                       train_weak=check_flag("train_weak", self.train_weak),
                       return_stats=check_flag("return_stats", self.return_stats),
                       backend=check_choice("backend", self.backend, BACKENDS))
        for name, value in checked.items():  # normalised: floats as float, ints as int
            object.__setattr__(self, name, value)

    @property
    def spec(self) -> MixedLossSpec:
        """The options every engine sees."""
        return MixedLossSpec(lam=self.lam, softcap=self.softcap,
                             gap_threshold=self.gap_threshold, ignore_index=self.ignore_index)

    def replace(self, **changes) -> "LossOptions":
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict:
        """The options as ``fused_loss`` keyword arguments."""
        return dataclasses.asdict(self)
