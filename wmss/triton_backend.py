"""The ``triton`` backend: the engine interface over the kernels of ``wmss_kernels``.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter, for
tests). Hidden states and weights are made contiguous in the last dimension, as the kernels
expect; nothing else is copied.
"""

from __future__ import annotations

from typing import Optional

import torch

import wmss_kernels
from wmss_kernels.results import GradRequest, MixedTokenStats, ModelGrads, SingleTokenStats

from .validation import MixedLossSpec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


class TritonEngine:
    """Forwards each operation to its launcher in ``wmss_kernels``.

    ``logit_source`` ("triton" or "cublas", see ``wmss_kernels.config.LOGIT_SOURCE``) is where the
    kernels get logit tiles from; None follows the configuration at each call. ``pinned()`` fixes
    it, so that a backward uses the source its forward used.
    """

    def __init__(self, logit_source: Optional[str] = None):
        self.logit_source = logit_source

    def pinned(self) -> "TritonEngine":
        from wmss_kernels.config import logit_source

        return TritonEngine(logit_source(self.logit_source))

    def mixed_forward(self, strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight,
                      weak_bias, labels, spec: MixedLossSpec) -> MixedTokenStats:
        tensors = [_unit_stride(t) for t in (strong_hidden, strong_weight, strong_bias,
                                              weak_hidden, weak_weight, weak_bias)]
        return wmss_kernels.mixed_token_stats(
            *tensors, labels, lam=spec.lam, softcap=spec.softcap,
            gap_threshold=spec.gap_threshold, ignore_index=spec.ignore_index,
            logit_source=self.logit_source)

    def single_forward(self, hidden, weight, bias, labels, softcap: Optional[float],
                       ignore_index: int) -> SingleTokenStats:
        return wmss_kernels.single_token_stats(
            _unit_stride(hidden), _unit_stride(weight), _unit_stride(bias), labels,
            softcap=softcap, ignore_index=ignore_index, logit_source=self.logit_source)

    def mixed_backward(self, strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight,
                       weak_bias, labels, max_strong, logsum_strong, max_mix, logsum_mix,
                       coef_mix, coef_strong,
                       spec: MixedLossSpec, strong_request: GradRequest,
                       weak_request: GradRequest) -> tuple[ModelGrads, ModelGrads]:
        tensors = [_unit_stride(t) for t in (strong_hidden, strong_weight, strong_bias,
                                              weak_hidden, weak_weight, weak_bias)]
        return wmss_kernels.mixed_ce_backward(
            *tensors, labels, max_strong, logsum_strong, max_mix, logsum_mix, coef_mix,
            coef_strong, lam=spec.lam,
            softcap=spec.softcap, strong_request=strong_request, weak_request=weak_request,
            logit_source=self.logit_source)
