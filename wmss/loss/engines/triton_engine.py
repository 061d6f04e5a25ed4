"""The ``triton`` engine: the ``FusedEngine`` contract over the launchers of ``wmss_kernels``.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter, for
tests). Hidden states and weights are made contiguous in the last dimension, as the kernels
expect; nothing else is copied.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..autograd import FusedEngineBase
from .contract import (
    GradRequest,
    LogSumExps,
    LogitTokenStats,
    MixedLossSpec,
    MixedTokenStats,
    ModelGrads,
    ModelInputs,
    SingleTokenStats,
    TokenCoefficients,
)


def _unit_stride(model: ModelInputs) -> ModelInputs:
    return model.map(lambda t: t if t.stride(-1) == 1 else t.contiguous())


class TritonEngine(FusedEngineBase):
    """Forwards each operation to its launcher in ``wmss_kernels``.

    ``logit_source`` ("triton" or "cublas", see ``wmss_kernels.config.LOGIT_SOURCE``) is where the
    kernels get logit tiles from; None follows the configuration at each call. ``pinned()`` fixes
    it, so that a backward uses the source its forward used.
    """

    supported_dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, logit_source: Optional[str] = None):
        self.logit_source = logit_source

    def pinned(self) -> "TritonEngine":
        from wmss_kernels.config import logit_source

        return TritonEngine(logit_source(self.logit_source))

    def mixed_forward(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                      spec: MixedLossSpec) -> MixedTokenStats:
        from wmss_kernels import mixed_token_stats

        return mixed_token_stats(_unit_stride(strong), _unit_stride(weak), labels, spec,
                                 logit_source=self.logit_source)

    def single_stats(self, model: ModelInputs, labels: torch.Tensor, softcap: Optional[float],
                     ignore_index: int) -> SingleTokenStats:
        from wmss_kernels import single_token_stats

        return single_token_stats(_unit_stride(model), labels, softcap=softcap,
                                  ignore_index=ignore_index, logit_source=self.logit_source)

    def logit_stats(self, model: ModelInputs, labels: Optional[torch.Tensor],
                    softcap: Optional[float], ignore_index: int) -> LogitTokenStats:
        """``wmss_kernels.logit_stats.logit_token_stats`` (always Triton-computed logit tiles:
        the logit source does not apply)."""
        from wmss_kernels.logit_stats import logit_token_stats

        return logit_token_stats(_unit_stride(model), labels, softcap=softcap,
                                 ignore_index=ignore_index)

    def mixed_backward(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                       lse: LogSumExps, coefficients: TokenCoefficients, spec: MixedLossSpec,
                       requests: tuple[GradRequest, GradRequest]) -> tuple[ModelGrads, ModelGrads]:
        from wmss_kernels import mixed_ce_backward

        return mixed_ce_backward(_unit_stride(strong), _unit_stride(weak), labels, lse,
                                 coefficients, spec, requests, logit_source=self.logit_source)
