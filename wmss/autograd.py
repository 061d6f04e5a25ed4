"""``MixedCrossEntropy``: the autograd Function around a backend engine's forward and backward.

The Function returns the per-token loss (differentiable) and the per-token statistics (not
differentiable). Reductions happen outside, in plain PyTorch, so the backward receives each
token's upstream gradient ``c_n`` and asks the engine for the gradients of ``sum_n c_n loss_n``,
computing only those that ``ctx.needs_input_grad`` asks for.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from wmss_kernels.results import GradRequest, MixedTokenStats

from .validation import MixedLossSpec


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


class MixedCrossEntropy(torch.autograd.Function):
    """Inputs are flat: hidden ``[N, d]``, weight ``[V, d]``, bias ``[V]`` or None, labels ``[N]``."""

    @staticmethod
    def forward(ctx, strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight,
                weak_bias, labels, spec: MixedLossSpec, engine):
        engine = engine.pinned()  # the backward runs with the configuration the forward saw
        stats = engine.mixed_forward(strong_hidden, strong_weight, strong_bias, weak_hidden,
                                     weak_weight, weak_bias, labels, spec)
        ctx.save_for_backward(strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight,
                              weak_bias, labels, stats.max_strong, stats.logsum_strong,
                              stats.max_mix, stats.logsum_mix, stats.mixed)
        ctx.spec, ctx.engine = spec, engine
        ctx.mark_non_differentiable(*stats[1:])
        return tuple(stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused_stat_grads):
        (strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias, labels,
         max_strong, logsum_strong, max_mix, logsum_mix, mixed) = ctx.saved_tensors
        spec: MixedLossSpec = ctx.spec
        needs = ctx.needs_input_grad
        strong_request, weak_request = GradRequest(*needs[0:3]), GradRequest(*needs[3:6])
        if grad_loss is None or not (strong_request.any or weak_request.any):
            return (None,) * 9

        supervised = labels != spec.ignore_index
        upstream = torch.where(supervised, grad_loss.float(), 0.0)
        coef_mix = torch.where(mixed, upstream, 0.0)
        coef_strong = None
        if spec.gap_threshold is not None:
            coef_strong = torch.where(mixed, 0.0, upstream)
        strong, weak = ctx.engine.mixed_backward(
            strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias,
            labels, max_strong, logsum_strong, max_mix, logsum_mix, coef_mix, coef_strong, spec,
            strong_request, weak_request)
        return (_cast(strong.hidden, strong_hidden), _cast(strong.weight, strong_weight),
                _cast(strong.bias, strong_bias), _cast(weak.hidden, weak_hidden),
                _cast(weak.weight, weak_weight), _cast(weak.bias, weak_bias), None, None, None)


def mixed_cross_entropy(strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight,
                        weak_bias, labels, spec: MixedLossSpec, engine) -> MixedTokenStats:
    """Apply ``MixedCrossEntropy``; returns ``MixedTokenStats`` whose ``loss`` is differentiable."""
    return MixedTokenStats(*MixedCrossEntropy.apply(strong_hidden, strong_weight, strong_bias,
                                                    weak_hidden, weak_weight, weak_bias, labels,
                                                    spec, engine))
