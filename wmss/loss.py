"""``wmss.fused_loss``: the WMSS mixed-logit cross-entropy from hidden states and lm-head weights.

The one entry point to the fused computation of docs/design.md section 2; ``FusedWMSSLoss``
is the same as an ``nn.Module``. See ``fused_loss`` for every option.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import backends, defaults, reference
from .autograd import mixed_cross_entropy
from .stats import TokenStats
from .validation import (
    BACKENDS,
    REDUCTIONS,
    MixedLossSpec,
    check_choice,
    check_flag,
    check_gap_threshold,
    check_head,
    check_ignore_index,
    check_labels,
    check_lam,
    check_num_items,
    check_pair_dtypes,
    check_same_device,
    check_softcap,
)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None outside ``torch.autocast``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def cast_for_autocast(device: torch.device, named: dict) -> dict:
    """As ``torch.nn.functional.linear`` does inside autocast, cast every floating input but
    float64 ones (autocast leaves float64 alone) to the autocast dtype (differentiably: gradients
    come back in each input's own dtype)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return named
    return {name: t if t is None or t.dtype == torch.float64 else t.to(dtype)
            for name, t in named.items()}


def reduce_loss(per_token: torch.Tensor, supervised: torch.Tensor, reduction: str,
                num_items_in_batch) -> torch.Tensor:
    """Reduce per-token losses (0 at ignored positions) without a host sync.

    "mean" divides by the number of supervised tokens, or by ``num_items_in_batch`` (validated
    by ``check_num_items``) when given. A count of 0 supervised tokens is replaced by 1, so a
    batch with nothing supervised gives 0.0, never NaN (a count of 0 is accepted only for a call
    with nothing supervised).
    """
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        return total / supervised.sum().to(total.dtype).clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        denominator = num_items_in_batch.to(device=total.device).reshape(())
    else:
        denominator = torch.tensor(num_items_in_batch, device=total.device)
    # A count of 0 (checked: nothing supervised here either, so the sum is 0) gives 0, not NaN.
    denominator = denominator.to(total.dtype)
    return total / torch.where(denominator == 0, torch.ones_like(denominator), denominator)


def fused_loss(
    strong_hidden: torch.Tensor,
    strong_weight: torch.Tensor,
    weak_hidden: torch.Tensor,
    weak_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float = defaults.LAMBDA,
    strong_bias: Optional[torch.Tensor] = None,
    weak_bias: Optional[torch.Tensor] = None,
    ignore_index: int = defaults.IGNORE_INDEX,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, float, torch.Tensor]] = None,
    softcap: Optional[float] = None,
    train_weak: bool = True,
    gap_threshold: Optional[float] = None,
    return_stats: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, tuple[torch.Tensor, TokenStats]]:
    """Cross-entropy of the mixed logits ``lam * z_strong + (1 - lam) * z_weak`` against ``labels``.

    ``z = softcap(hidden @ weight^T + bias)`` for each model; the ``[tokens, vocab]`` logits are
    never materialised (backends "triton" and "torch"): the vocabulary is processed in blocks
    with an online log-sum-exp, and the backward recomputes the blocks.

    Args:
        strong_hidden: ``(..., d_s)`` final hidden states of the strong model.
        strong_weight: ``(V, d_s)`` lm-head weight of the strong model.
        weak_hidden: ``(..., d_w)`` final hidden states of the weak model (same leading shape).
        weak_weight: ``(V, d_w)`` lm-head weight of the weak model (same vocabulary).
        labels: ``(...)`` integer targets aligned with the hidden states (no shift inside), each in
            ``[0, V)`` or equal to ``ignore_index``.
        lam: mixing weight in [0, 1]; 1 is plain strong cross-entropy, 0 plain weak.
        strong_bias, weak_bias: optional ``(V,)`` lm-head biases.
        ignore_index: label value of positions that are not supervised.
        reduction: "mean" (over supervised tokens), "sum", or "none" (per-token losses shaped
            like ``labels``, 0 at ignored positions).
        num_items_in_batch: with "mean", divide the sum by this count instead (gradient
            accumulation: the supervised tokens of the whole accumulated batch): an int >= 1, or a
            one-element tensor, integer (>= 1) or floating (finite, > 0; Hugging Face Trainer
            passes a float tensor). A tensor on a GPU is checked in the host sync of the label
            check, none extra (see ``wmss.validation.check_num_items``).
        softcap: final-logit soft-capping ``c * tanh(z / c)``, per model before mixing (Gemma 2/3).
        train_weak: False freezes the weak model: no gradient reaches ``weak_*``, and its gradient
            products are skipped.
        gap_threshold: gap masking. A supervised token with ``H_weak - H_strong < gap_threshold``
            is trained with plain strong cross-entropy and sends no gradient to the weak branch.
            None mixes every supervised token, as in the paper.
        return_stats: also return ``TokenStats`` (entropies, log-probs, the mixed mask).
        backend: "auto" (Triton on CUDA, else "torch"; "torch" for float64 inputs), "triton",
            "torch" or "reference" (the plain formula with materialised logits, for tests and
            debugging).

    Returns:
        The loss (a scalar, or per-token for "none"); with ``return_stats``, the pair
        ``(loss, stats)``. A batch with no supervised token gives 0.0 and zero gradients. The loss
        and the statistics are float32, or float64 when either model's inputs are float64.

    Dtypes follow ``torch.nn.functional.linear``: inside ``torch.autocast`` hidden states, weights
    and biases are cast to the autocast dtype (float64 ones excepted, as autocast leaves them);
    outside it each model's tensors must share a dtype, but the two models may differ (e.g. a
    float64 strong and a float32 weak model). Gradients come back in each input's own dtype.
    Accumulation is float32, or float64 throughout when either model is float64 (backends
    "torch" and "reference"; ``backend="triton"`` refuses float64 inputs with a ValueError, and
    "auto" picks "torch" for them).

    Gradients are first-order only on the fused backends: a backward with
    ``create_graph=True`` (double backward, e.g. a gradient penalty) raises a RuntimeError on
    "torch" and "triton"; "reference" supports it.

    Raises:
        TypeError, ValueError: naming the argument at fault (see ``wmss.validation``).
        RuntimeError: from the backward, when run with ``create_graph=True`` on "torch" or
            "triton".
    """
    spec = MixedLossSpec(lam=check_lam(lam), softcap=check_softcap(softcap),
                         gap_threshold=check_gap_threshold(gap_threshold),
                         ignore_index=check_ignore_index(ignore_index))
    check_choice("reduction", reduction, REDUCTIONS)
    check_flag("train_weak", train_weak)
    check_flag("return_stats", return_stats)
    num_items_in_batch = check_num_items(num_items_in_batch, reduction)
    check_head("strong_", strong_hidden, strong_weight, strong_bias)
    check_head("weak_", weak_hidden, weak_weight, weak_bias)
    if weak_weight.shape[0] != strong_weight.shape[0]:
        raise ValueError(f"weak_weight has vocabulary size {weak_weight.shape[0]} but strong_weight "
                         f"has {strong_weight.shape[0]}; both models must share one vocabulary")
    if weak_hidden.shape[:-1] != strong_hidden.shape[:-1]:
        raise ValueError(f"weak_hidden has leading shape {tuple(weak_hidden.shape[:-1])} but "
                         f"strong_hidden has {tuple(strong_hidden.shape[:-1])}")
    named = dict(strong_hidden=strong_hidden, strong_weight=strong_weight,
                 strong_bias=strong_bias, weak_hidden=weak_hidden, weak_weight=weak_weight,
                 weak_bias=weak_bias)
    device = check_same_device({**named, "labels": labels})
    labels = check_labels(labels, strong_hidden.shape[:-1], strong_weight.shape[0],
                          spec.ignore_index, num_items=num_items_in_batch)
    named = cast_for_autocast(device, named)
    under_autocast = autocast_dtype(device) is not None
    for prefix in ("strong_", "weak_"):
        check_pair_dtypes(prefix, *(named[prefix + part] for part in ("hidden", "weight", "bias")),
                          under_autocast=under_autocast)
    if not train_weak:
        named.update({k: v.detach() for k, v in named.items() if k.startswith("weak") and v is not None})
    backend = backends.resolve(backend, device, [(k, v.dtype) for k, v in named.items()
                                                 if v is not None])

    shape = labels.shape
    flat = [None if t is None else (t.reshape(-1, t.shape[-1]) if k.endswith("hidden") else t)
            for k, t in named.items()]
    flat_labels = labels.reshape(-1)
    with torch.autocast(device.type, enabled=False):
        if backend == "reference":
            out = reference.mixed_loss(*flat, flat_labels, spec)
        else:
            out = mixed_cross_entropy(*flat, flat_labels, spec, backends.engine(backend))
    supervised = flat_labels != spec.ignore_index
    loss = reduce_loss(out.loss, supervised, reduction, num_items_in_batch)
    if reduction == "none":
        loss = loss.reshape(shape)
    if not return_stats:
        return loss
    stats = TokenStats(out.entropy_strong, out.entropy_weak, out.logprob_strong,
                       out.logprob_weak, out.logprob_mix, out.mixed)
    return loss, stats.map(lambda t: t.reshape(shape))


class FusedWMSSLoss(torch.nn.Module):
    """``fused_loss`` as a module: the options are fixed at construction.

    Example::

        criterion = wmss.FusedWMSSLoss(lam=0.5)
        loss = criterion(strong_hidden, strong_head.weight, weak_hidden, weak_head.weight, labels)
    """

    def __init__(self, *, lam: float = defaults.LAMBDA, ignore_index: int = defaults.IGNORE_INDEX,
                 reduction: str = "mean", softcap: Optional[float] = None, train_weak: bool = True,
                 gap_threshold: Optional[float] = None, return_stats: bool = False,
                 backend: str = "auto"):
        super().__init__()
        # Validate now, so a bad option fails at construction rather than at the first step.
        check_lam(lam), check_softcap(softcap), check_gap_threshold(gap_threshold)
        check_ignore_index(ignore_index), check_choice("reduction", reduction, REDUCTIONS)
        check_choice("backend", backend, BACKENDS)
        check_flag("train_weak", train_weak), check_flag("return_stats", return_stats)
        self.options = dict(lam=lam, ignore_index=ignore_index, reduction=reduction,
                            softcap=softcap, train_weak=train_weak, gap_threshold=gap_threshold,
                            return_stats=return_stats, backend=backend)

    def forward(self, strong_hidden, strong_weight, weak_hidden, weak_weight, labels, *,
                strong_bias=None, weak_bias=None, num_items_in_batch=None):
        return fused_loss(strong_hidden, strong_weight, weak_hidden, weak_weight, labels,
                          strong_bias=strong_bias, weak_bias=weak_bias,
                          num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
