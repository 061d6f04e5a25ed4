"""A fused engine's forward and backward as one differentiable operation: two custom ops.

``wmss::mixed_forward`` runs the engine's ``mixed_forward`` and returns the per-token loss
(differentiable) and statistics (not differentiable); its autograd formula calls
``wmss::mixed_backward``, which asks the engine for the gradients of ``sum_n c_n loss_n``, computing
only those that ``ctx.needs_input_grad`` asks for. Reductions happen outside, in plain PyTorch, so
the backward receives each token's upstream gradient ``c_n``.

Why custom ops, not a plain ``torch.autograd.Function``: ``torch.compile`` treats a custom op as
one opaque call with the output shapes of its fake implementation (``register_fake``), so a
compiled step (``fullgraph=True`` included) neither traces into the engines' block loops nor
breaks the graph at them. The ops take tensors and plain scalars; the engine is named by its
``key`` (its class and attributes, which ``engine_from_key`` turns back into the engine).

The engines' backward is itself a fused computation, not a graph of differentiable operations:
a backward with ``create_graph=True`` (double backward) is refused, not answered with gradients
that autograd would treat as constants (which would silently drop every second-order term).
"""

from __future__ import annotations

import ast
import functools
import importlib
import typing
from typing import Optional

import torch

from .engines.contract import (
    FusedEngine,
    GradRequest,
    LogSumExps,
    MixedLossSpec,
    MixedTokenStats,
    ModelInputs,
    TokenCoefficients,
    compute_dtype,
)

DOUBLE_BACKWARD_ERROR = (
    "wmss.fused_loss: double backward (a backward with create_graph=True, e.g. for a gradient "
    "penalty) is not supported by the fused backends ('torch', 'triton', ...): their gradients "
    "come from fused kernels that have no derivative of their own. Use backend='reference' (it "
    "materialises the [tokens, vocab] logits), which autograd differentiates to any order.")

Tensor = torch.Tensor
KEY_SEPARATOR = "|"


@functools.lru_cache(maxsize=None)  # engines hold configuration only: one per key
def engine_from_key(key: str) -> FusedEngine:
    """The engine ``FusedEngineBase.key`` names: its class, with its attributes restored."""
    module, qualname, state = key.split(KEY_SEPARATOR, 2)
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    try:
        attributes = ast.literal_eval(state)
    except (ValueError, SyntaxError):
        attributes = None
    if not isinstance(attributes, dict) or repr(attributes) != state:
        raise TypeError(f"{qualname}'s attributes must be plain Python values (numbers, strings, "
                        f"None, tuples...): they are its configuration, which the custom ops "
                        f"carry as text; got {state}")
    engine = cls.__new__(cls)
    vars(engine).update(attributes)
    return engine


def _spec(lam, softcap, gap_threshold, ignore_index) -> MixedLossSpec:
    return MixedLossSpec(lam=lam, softcap=softcap, gap_threshold=gap_threshold,
                         ignore_index=ignore_index)


def _mixed_forward(strong_hidden: Tensor, strong_weight: Tensor, strong_bias: Optional[Tensor],
                   weak_hidden: Tensor, weak_weight: Tensor, weak_bias: Optional[Tensor],
                   labels: Tensor, lam: float, softcap: Optional[float],
                   gap_threshold: Optional[float], ignore_index: int, engine: str):
    stats = engine_from_key(engine).mixed_forward(
        ModelInputs(strong_hidden, strong_weight, strong_bias),
        ModelInputs(weak_hidden, weak_weight, weak_bias), labels,
        _spec(lam, softcap, gap_threshold, ignore_index))
    return _unaliased(stats)


def _unaliased(tensors) -> tuple:
    """``tensors`` with each one that shares storage with an earlier one copied: an op's outputs
    may not alias each other (the Triton launcher returns its per-token outputs as rows of one
    tensor: O(N) copies)."""
    seen, result = set(), []
    for t in tensors:
        storage = t.untyped_storage().data_ptr()
        if storage in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        result.append(t)
    return tuple(result)


_mixed_forward.__annotations__["return"] = typing.Tuple[(Tensor,) * len(MixedTokenStats._fields)]
mixed_forward_op = torch.library.custom_op("wmss::mixed_forward", _mixed_forward,
                                           mutates_args=())


@mixed_forward_op.register_fake
def _mixed_forward_fake(strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight,
                        weak_bias, labels, lam, softcap, gap_threshold, ignore_index, engine):
    dtype = compute_dtype(strong_hidden.dtype, weak_hidden.dtype)
    per_token = [labels.new_empty(labels.shape, dtype=dtype)
                 for _ in range(len(MixedTokenStats._fields) - 1)]
    return (*per_token, labels.new_empty(labels.shape, dtype=torch.bool))


def _mixed_backward(strong_hidden: Tensor, strong_weight: Tensor, strong_bias: Optional[Tensor],
                    weak_hidden: Tensor, weak_weight: Tensor, weak_bias: Optional[Tensor],
                    labels: Tensor, max_strong: Tensor, logsum_strong: Tensor, max_mix: Tensor,
                    logsum_mix: Tensor, coef_mix: Tensor, coef_strong: Optional[Tensor],
                    lam: float, softcap: Optional[float], gap_threshold: Optional[float],
                    ignore_index: int, engine: str, requests: list[bool]):
    """The gradients, each in its input's dtype; an empty tensor where not requested (an op
    returns tensors, never None)."""
    strong = ModelInputs(strong_hidden, strong_weight, strong_bias)
    weak = ModelInputs(weak_hidden, weak_weight, weak_bias)
    grads = engine_from_key(engine).mixed_backward(
        strong, weak, labels, LogSumExps(max_strong, logsum_strong, max_mix, logsum_mix),
        TokenCoefficients(coef_mix, coef_strong), _spec(lam, softcap, gap_threshold, ignore_index),
        (GradRequest(*requests[:3]), GradRequest(*requests[3:])))
    return _unaliased(labels.new_empty(0, dtype=like.dtype) if grad is None
                      else _in_layout_of(grad, like)
                      for model_grads, inputs in zip(grads, (strong, weak))
                      for grad, like in zip(model_grads, _inputs_or_labels(inputs, labels)))


def _in_layout_of(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` in ``like``'s dtype and strides (what the fake implementation promises; a copy
    only for an input that is not laid out as the engine's gradient, e.g. a transposed weight)."""
    grad = grad.to(like.dtype)
    if grad.stride() == like.stride():
        return grad
    out = torch.empty_like(like)
    out.copy_(grad)
    return out


def _inputs_or_labels(inputs: ModelInputs, labels: Tensor):
    """Each input, or for a missing bias ``labels`` (only its dtype is read: no gradient)."""
    return tuple(labels if t is None else t for t in inputs)


_mixed_backward.__annotations__["return"] = typing.Tuple[(Tensor,) * 6]
mixed_backward_op = torch.library.custom_op("wmss::mixed_backward", _mixed_backward,
                                            mutates_args=())


@mixed_backward_op.register_fake
def _mixed_backward_fake(strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight,
                         weak_bias, labels, *rest):
    requests = rest[-1]
    inputs = (strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias)
    # Each gradient in its input's layout, as the real op returns it (a transposed weight too).
    return tuple(torch.empty_like(t) if wanted else labels.new_empty(
        0, dtype=labels.dtype if t is None else t.dtype) for t, wanted in zip(inputs, requests))


def _setup_context(ctx, inputs, output):
    tensors, (lam, softcap, gap_threshold, ignore_index, engine) = inputs[:7], inputs[7:]
    stats = MixedTokenStats(*output)
    ctx.save_for_backward(*tensors, *stats.log_sum_exps, stats.mixed)
    ctx.options = (lam, softcap, gap_threshold, ignore_index, engine)
    ctx.device_type = tensors[6].device.type
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *unused_stat_grads):
    # Autograd enables grad mode in a backward exactly when it runs with create_graph=True.
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)
    no_gradients = (None,) * (7 + len(ctx.options))
    requests = [bool(needed) for needed in ctx.needs_input_grad[:6]]
    if grad_loss is None or not any(requests):
        return no_gradients
    *inputs, labels, max_strong, logsum_strong, max_mix, logsum_mix, mixed = ctx.saved_tensors
    lam, softcap, gap_threshold, ignore_index, engine = ctx.options
    supervised = labels != ignore_index
    # In the dtype of the saved statistics: float32, or float64 for float64 inputs.
    upstream = torch.where(supervised, grad_loss.to(max_mix.dtype), 0.0)
    coef_mix = torch.where(mixed, upstream, 0.0)
    coef_strong = None if gap_threshold is None else torch.where(mixed, 0.0, upstream)
    # A backward called inside torch.autocast runs under it too: the engines' products must see
    # the dtypes their forward saw, not autocast's.
    with torch.autocast(ctx.device_type, enabled=False):
        grads = mixed_backward_op(*inputs, labels, max_strong, logsum_strong, max_mix, logsum_mix,
                                  coef_mix, coef_strong, lam, softcap, gap_threshold,
                                  ignore_index, engine, requests)
    return (*(grad if wanted else None for grad, wanted in zip(grads, requests)),
            *no_gradients[6:])


mixed_forward_op.register_autograd(_backward, setup_context=_setup_context)


def mixed_cross_entropy(engine: FusedEngine, strong: ModelInputs, weak: ModelInputs,
                        labels: torch.Tensor, spec: MixedLossSpec) -> MixedTokenStats:
    """The fused loss of ``engine``: ``MixedTokenStats`` whose ``loss`` is differentiable."""
    return MixedTokenStats(*mixed_forward_op(
        *strong, *weak, labels, spec.lam, spec.softcap, spec.gap_threshold, spec.ignore_index,
        engine.pinned().key))  # the backward runs with the configuration the forward saw


class FusedEngineBase:
    """Gives a fused engine (``mixed_forward``, ``mixed_backward``, ``pinned``) the differentiable
    ``mixed_loss`` of the ``Engine`` contract, through the ops above, and its ``key``."""

    @property
    def key(self) -> str:
        """The engine as a string the ops carry: its class and its attributes (plain Python
        values: an engine's state is its configuration), read back by ``engine_from_key``."""
        cls = type(self)
        state = dict(sorted(vars(self).items()))
        if "<locals>" in cls.__qualname__:
            raise TypeError(f"{cls.__qualname__}: a fused engine must be a module-level class "
                            "(the custom ops rebuild it from its import path)")
        return KEY_SEPARATOR.join((cls.__module__, cls.__qualname__, repr(state)))

    def mixed_loss(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                   spec: MixedLossSpec) -> MixedTokenStats:
        return mixed_cross_entropy(self, strong, weak, labels, spec)
