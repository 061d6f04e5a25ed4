"""``MixedCrossEntropy``: the autograd Function around a fused engine's forward and backward.

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

from .engines.contract import (
    FusedEngine,
    GradRequest,
    LogSumExps,
    MixedLossSpec,
    MixedTokenStats,
    ModelInputs,
    TokenCoefficients,
)

DOUBLE_BACKWARD_ERROR = (
    "wmss.fused_loss: double backward (a backward with create_graph=True, e.g. for a gradient "
    "penalty) is not supported by the fused backends 'torch' and 'triton': their gradients come "
    "from fused kernels that have no derivative of their own. Use backend='reference' (it "
    "materialises the [tokens, vocab] logits), which autograd differentiates to any order.")

# Positions of the tensors in MixedCrossEntropy.forward's arguments (after ctx).
_STRONG, _WEAK = slice(0, 3), slice(3, 6)
_NUM_ARGUMENTS = 9


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


class MixedCrossEntropy(torch.autograd.Function):
    """Arguments: the strong and the weak model's ``ModelInputs`` as six tensors (autograd tracks
    each), labels ``[N]``, the ``MixedLossSpec`` and the ``FusedEngine``."""

    @staticmethod
    def forward(ctx, strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight,
                weak_bias, labels, spec: MixedLossSpec, engine: FusedEngine):
        engine = engine.pinned()  # the backward runs with the configuration the forward saw
        strong = ModelInputs(strong_hidden, strong_weight, strong_bias)
        weak = ModelInputs(weak_hidden, weak_weight, weak_bias)
        stats = engine.mixed_forward(strong, weak, labels, spec)
        ctx.save_for_backward(*strong, *weak, labels, *stats.log_sum_exps, stats.mixed)
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
        saved = ctx.saved_tensors
        strong, weak = ModelInputs(*saved[_STRONG]), ModelInputs(*saved[_WEAK])
        labels, lse, mixed = saved[6], LogSumExps(*saved[7:11]), saved[11]
        spec: MixedLossSpec = ctx.spec
        needs = ctx.needs_input_grad
        requests = GradRequest(*needs[_STRONG]), GradRequest(*needs[_WEAK])
        if grad_loss is None or not (requests[0].any or requests[1].any):
            return (None,) * _NUM_ARGUMENTS

        supervised = labels != spec.ignore_index
        # In the dtype of the saved statistics: float32, or float64 for float64 inputs.
        upstream = torch.where(supervised, grad_loss.to(lse.max_mix.dtype), 0.0)
        coefficients = TokenCoefficients(
            mix=torch.where(mixed, upstream, 0.0),
            strong=None if spec.gap_threshold is None else torch.where(mixed, 0.0, upstream))
        grads = ctx.engine.mixed_backward(strong, weak, labels, lse, coefficients, spec, requests)
        casts = [_cast(grad, like) for model_grads, inputs in zip(grads, (strong, weak))
                 for grad, like in zip(model_grads, inputs)]
        return (*casts, None, None, None)


def mixed_cross_entropy(engine: FusedEngine, strong: ModelInputs, weak: ModelInputs,
                        labels: torch.Tensor, spec: MixedLossSpec) -> MixedTokenStats:
    """Apply ``MixedCrossEntropy``; returns ``MixedTokenStats`` whose ``loss`` is differentiable."""
    return MixedTokenStats(*MixedCrossEntropy.apply(*strong, *weak, labels, spec, engine))


class FusedEngineBase:
    """Gives a fused engine (``mixed_forward``, ``mixed_backward``, ``pinned``) the differentiable
    ``mixed_loss`` of the ``Engine`` contract, through ``MixedCrossEntropy``."""

    def mixed_loss(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                   spec: MixedLossSpec) -> MixedTokenStats:
        return mixed_cross_entropy(self, strong, weak, labels, spec)
