"""A fused engine's forward and backward as one differentiable operation: two custom ops.

``wmss::mixed_forward`` runs the engine's ``mixed_forward`` and returns the per-token loss
(differentiable) and statistics (not differentiable); its autograd formula calls
``wmss::mixed_backward``, which asks the engine for the gradients of ``sum_n c_n loss_n``, computing
only those that ``ctx.needs_input_grad`` asks for. Reductions happen outside, in plain PyTorch, so
the backward receives each token's upstream gradient ``c_n``. An engine that can compute the
gradients in its forward (``has_forward_grads``: the native engine) goes through
``wmss::mixed_forward_with_grads`` and ``wmss::scale_forward_grads`` instead whenever a gradient
will be needed (see below).

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
    has_forward_grads,
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


# ---- engines that compute the gradients in the forward (``has_forward_grads``) ----------------
#
# ``wmss::mixed_forward_with_grads`` returns the statistics and the gradients for a unit upstream
# gradient (``FusedEngine.mixed_forward_with_grads``); its backward, ``wmss::scale_forward_grads``,
# scales them: ``hidden`` rows by each token's upstream gradient (exact: a row is one token's),
# ``weight`` and ``bias`` by the upstream gradient of the supervised tokens when they all share it
# (reductions "mean" and "sum": the training case), and otherwise asks the engine's
# ``mixed_backward`` for those. The choice depends on the values of the upstream gradient, so it
# is made inside the op, where ``torch.compile`` does not trace.

def _mixed_forward_with_grads(strong_hidden: Tensor, strong_weight: Tensor,
                              strong_bias: Optional[Tensor], weak_hidden: Tensor,
                              weak_weight: Tensor, weak_bias: Optional[Tensor], labels: Tensor,
                              lam: float, softcap: Optional[float],
                              gap_threshold: Optional[float], ignore_index: int, engine: str,
                              requests: list[bool]):
    """``MixedTokenStats``, then the six unit-upstream gradients (compute dtype; an empty tensor
    where not requested)."""
    strong = ModelInputs(strong_hidden, strong_weight, strong_bias)
    weak = ModelInputs(weak_hidden, weak_weight, weak_bias)
    stats, grads = engine_from_key(engine).mixed_forward_with_grads(
        strong, weak, labels, _spec(lam, softcap, gap_threshold, ignore_index),
        (GradRequest(*requests[:3]), GradRequest(*requests[3:])))
    empty = labels.new_empty(0, dtype=stats.loss.dtype)
    flat = [empty.clone() if grad is None else grad for model in grads for grad in model]
    return _unaliased((*stats, *flat))


_mixed_forward_with_grads.__annotations__["return"] = typing.Tuple[
    (Tensor,) * (len(MixedTokenStats._fields) + 6)]
mixed_forward_with_grads_op = torch.library.custom_op(
    "wmss::mixed_forward_with_grads", _mixed_forward_with_grads, mutates_args=())


@mixed_forward_with_grads_op.register_fake
def _mixed_forward_with_grads_fake(strong_hidden, strong_weight, strong_bias, weak_hidden,
                                   weak_weight, weak_bias, labels, lam, softcap, gap_threshold,
                                   ignore_index, engine, requests):
    stats = _mixed_forward_fake(strong_hidden, strong_weight, strong_bias, weak_hidden,
                                weak_weight, weak_bias, labels, lam, softcap, gap_threshold,
                                ignore_index, engine)
    dtype = stats[0].dtype
    inputs = (strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias)
    grads = tuple(labels.new_empty(t.shape if wanted else (0,), dtype=dtype)
                  for t, wanted in zip(inputs, requests))
    return (*stats, *grads)


def _finish_unit_grads(strong: ModelInputs, weak: ModelInputs, labels: Tensor, lse: LogSumExps,
                       mixed: Tensor, grad_loss: Tensor, unit_grads: Optional[list[Tensor]],
                       spec: MixedLossSpec, engine: str, requests: list[bool],
                       precomputed: list[bool], in_place: bool) -> tuple[Tensor, ...]:
    """The requested gradients from the unit-upstream ones (``precomputed`` says which exist;
    ``unit_grads`` None: none), each in its input's dtype and layout, an empty tensor where not
    requested. ``in_place`` scales ``unit_grads`` themselves (eager, used once), else copies."""
    supervised = labels != spec.ignore_index
    upstream = torch.where(supervised, grad_loss.to(lse.max_mix.dtype), 0.0)
    values = upstream[supervised]
    # Every supervised token's upstream gradient the same (NaN never equals itself: recomputed).
    shared = values.numel() == 0 or bool((values == values[0]).all())
    scale = values[0] if values.numel() else upstream.new_zeros(())
    grads: list[Optional[Tensor]] = [None] * 6
    for index, (wanted, have) in enumerate(zip(requests, precomputed)):
        if not (wanted and have and unit_grads is not None):
            continue
        factor = upstream[:, None] if index % 3 == 0 else scale  # hidden: one row per token
        if index % 3 == 0 or shared:
            unit = unit_grads[index]
            grads[index] = unit.mul_(factor) if in_place else unit * factor
    missing = [wanted and grad is None for wanted, grad in zip(requests, grads)]
    if any(missing):
        coef_mix = torch.where(mixed, upstream, 0.0)
        coef_strong = None if spec.gap_threshold is None else torch.where(mixed, 0.0, upstream)
        recomputed = engine_from_key(engine).mixed_backward(
            strong, weak, labels, lse, TokenCoefficients(coef_mix, coef_strong), spec,
            (GradRequest(*missing[:3]), GradRequest(*missing[3:])))
        for index, grad in enumerate((*recomputed[0], *recomputed[1])):
            if missing[index]:
                grads[index] = grad
    likes = (*_inputs_or_labels(strong, labels), *_inputs_or_labels(weak, labels))
    return _unaliased(labels.new_empty(0, dtype=like.dtype) if grad is None
                      else _in_layout_of(grad, like) for grad, like in zip(grads, likes))


def _scale_forward_grads(strong_hidden: Tensor, strong_weight: Tensor,
                         strong_bias: Optional[Tensor], weak_hidden: Tensor, weak_weight: Tensor,
                         weak_bias: Optional[Tensor], labels: Tensor, max_strong: Tensor,
                         logsum_strong: Tensor, max_mix: Tensor, logsum_mix: Tensor,
                         mixed: Tensor, grad_loss: Tensor, unit_grads: list[Tensor], lam: float,
                         softcap: Optional[float], gap_threshold: Optional[float],
                         ignore_index: int, engine: str, requests: list[bool],
                         precomputed: list[bool]):
    """``_finish_unit_grads`` as an op (the backward of a compiled step; no in-place)."""
    return _finish_unit_grads(
        ModelInputs(strong_hidden, strong_weight, strong_bias),
        ModelInputs(weak_hidden, weak_weight, weak_bias), labels,
        LogSumExps(max_strong, logsum_strong, max_mix, logsum_mix), mixed, grad_loss,
        unit_grads, _spec(lam, softcap, gap_threshold, ignore_index), engine, requests,
        precomputed, in_place=False)


_scale_forward_grads.__annotations__["return"] = typing.Tuple[(Tensor,) * 6]
scale_forward_grads_op = torch.library.custom_op("wmss::scale_forward_grads",
                                                 _scale_forward_grads, mutates_args=())


@scale_forward_grads_op.register_fake
def _scale_forward_grads_fake(strong_hidden, strong_weight, strong_bias, weak_hidden,
                              weak_weight, weak_bias, labels, *rest):
    requests = rest[-2]
    inputs = (strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias)
    return tuple(torch.empty_like(t) if wanted else labels.new_empty(
        0, dtype=labels.dtype if t is None else t.dtype) for t, wanted in zip(inputs, requests))


def _setup_context_with_grads(ctx, inputs, output):
    tensors, options, requests = inputs[:7], inputs[7:12], inputs[12]
    count = len(MixedTokenStats._fields)
    stats, unit_grads = MixedTokenStats(*output[:count]), output[count:]
    saved = (*tensors, *stats.log_sum_exps, stats.mixed)
    # Eager (plain tensors): the unit gradients are kept on ctx, not saved, so that the backward
    # can scale them in place and hand them to autograd as the gradients (no second set); a
    # traced step (torch.compile: tensor subclasses here) saves them for its functional backward.
    ctx.traced = any(type(t) is not torch.Tensor for t in output)
    ctx.save_for_backward(*saved, *(unit_grads if ctx.traced else ()))
    ctx.unit_grads = None if ctx.traced else list(unit_grads)
    ctx.options = options
    ctx.precomputed = [bool(flag) for flag in requests]
    ctx.device_type = tensors[6].device.type
    ctx.mark_non_differentiable(*output[1:])
    # No zero-filled gradients for the outputs nothing flows into: the unit gradients are the
    # size of the weights (a missing grad_loss arrives as None).
    ctx.set_materialize_grads(False)


def _backward_with_grads(ctx, grad_loss, *unused_grads):
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)
    no_gradients = (None,) * (7 + len(ctx.options) + 1)
    requests = [bool(needed) for needed in ctx.needs_input_grad[:6]]
    if grad_loss is None or not any(requests):
        return no_gradients
    saved = ctx.saved_tensors
    *inputs, labels, max_strong, logsum_strong, max_mix, logsum_mix, mixed = saved[:12]
    lam, softcap, gap_threshold, ignore_index, engine = ctx.options
    with torch.autocast(ctx.device_type, enabled=False):
        if ctx.traced:
            grads = scale_forward_grads_op(*inputs, labels, max_strong, logsum_strong, max_mix,
                                           logsum_mix, mixed, grad_loss, list(saved[12:]), lam,
                                           softcap, gap_threshold, ignore_index, engine,
                                           requests, ctx.precomputed)
        else:
            # Used once: a second backward through a retained graph recomputes everything.
            unit_grads, ctx.unit_grads = ctx.unit_grads, None
            grads = _finish_unit_grads(
                ModelInputs(*inputs[:3]), ModelInputs(*inputs[3:]), labels,
                LogSumExps(max_strong, logsum_strong, max_mix, logsum_mix), mixed, grad_loss,
                unit_grads, _spec(lam, softcap, gap_threshold, ignore_index), engine, requests,
                ctx.precomputed, in_place=True)
            del unit_grads
    return (*(grad if wanted else None for grad, wanted in zip(grads, requests)),
            *no_gradients[6:])


mixed_forward_with_grads_op.register_autograd(_backward_with_grads,
                                              setup_context=_setup_context_with_grads)


def _gradient_requests(strong: ModelInputs, weak: ModelInputs) -> list[bool]:
    """Which of the six inputs autograd will want a gradient for (none under no_grad)."""
    if not torch.is_grad_enabled():
        return [False] * 6
    return [t is not None and t.requires_grad for t in (*strong, *weak)]


def mixed_cross_entropy(engine: FusedEngine, strong: ModelInputs, weak: ModelInputs,
                        labels: torch.Tensor, spec: MixedLossSpec) -> MixedTokenStats:
    """The fused loss of ``engine``: ``MixedTokenStats`` whose ``loss`` is differentiable.

    An engine with ``mixed_forward_with_grads`` computes the gradients in the forward when some
    input will need one; otherwise (and always for other engines) the forward computes only the
    statistics and the backward recomputes the logits."""
    pinned = engine.pinned()  # the backward runs with the configuration the forward saw
    args = (*strong, *weak, labels, spec.lam, spec.softcap, spec.gap_threshold,
            spec.ignore_index, pinned.key)
    if has_forward_grads(pinned):
        requests = _gradient_requests(strong, weak)
        if any(requests):
            out = mixed_forward_with_grads_op(*args, requests)
            return MixedTokenStats(*out[:len(MixedTokenStats._fields)])
    return MixedTokenStats(*mixed_forward_op(*args))


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
