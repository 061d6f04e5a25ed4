"""``MixedCrossEntropy``: the autograd Function around a backend engine's forward and backward.

The Function returns the per-token loss (differentiable) and the per-token statistics (not
differentiable). Reductions happen outside, in plain PyTorch, so the backward receives each
token's upstream gradient ``c_n`` and asks the engine for the gradients of ``sum_n c_n loss_n``,
computing only those that ``ctx.needs_input_grad`` asks for.

The engines' backward is itself a fused computation, not a graph of differentiable operations:
a backward with ``create_graph=True`` (double backward) is refused, not answered with gradients
that autograd would treat as constants (which would silently drop every second-order term).
"""

from __future__ import annotations

import torch

from wmss_kernels.results import GradRequest, MixedTokenStats

from .validation import MixedLossSpec


DOUBLE_BACKWARD_ERROR = (
    "wmss.fused_loss: double backward (a backward with create_graph=True, e.g. for a gradient "
    "penalty) is not supported by the fused backends 'torch' and 'triton': their gradients come "
    "from fused kernels that have no derivative of their own. Use backend='reference' (it "
    "materialises the [tokens, vocab] logits), which autograd differentiates to any order.")


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
        ctx.spec, ctx.engine, ctx.device_type = spec, engine, labels.device.type
        ctx.mark_non_differentiable(*stats[1:])
        return tuple(stats)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        # Autograd enables grad mode in a backward exactly when it runs with create_graph=True.
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        # A backward called inside torch.autocast runs under it too: the engines' products must
        # see the dtypes their forward saw, not autocast's.
        with torch.autocast(ctx.device_type, enabled=False):
            return MixedCrossEntropy._gradients(ctx, grad_loss)

    @staticmethod
    def _gradients(ctx, grad_loss):
        (strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias, labels,
         max_strong, logsum_strong, max_mix, logsum_mix, mixed) = ctx.saved_tensors
        spec: MixedLossSpec = ctx.spec
        needs = ctx.needs_input_grad
        strong_request, weak_request = GradRequest(*needs[0:3]), GradRequest(*needs[3:6])
        if grad_loss is None or not (strong_request.any or weak_request.any):
            return (None,) * 9

        supervised = labels != spec.ignore_index
        # In the dtype of the saved statistics: float32, or float64 for float64 inputs.
        upstream = torch.where(supervised, grad_loss.to(max_mix.dtype), 0.0)
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
