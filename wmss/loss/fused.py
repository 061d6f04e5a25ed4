"""``wmss.fused_loss``: the WMSS mixed-logit cross-entropy from hidden states and lm-head weights.

The one entry point to the fused computation of docs/design.md section 2; ``FusedWMSSLoss``
is the same as an ``nn.Module``. See ``fused_loss`` for every option.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import defaults
from . import engines
from .engines.contract import ModelInputs
from .inputs import prepare_pair
from .options import LossOptions
from .stats import TokenStats


def reduce_loss(per_token: torch.Tensor, supervised: torch.Tensor, reduction: str,
                num_items_in_batch) -> torch.Tensor:
    """Reduce per-token losses (0 at ignored positions) without a host sync.

    "mean" divides by the number of supervised tokens, or by ``num_items_in_batch`` (validated
    by ``wmss.loss.inputs.check_num_items``) when given. A count of 0 supervised tokens is
    replaced by 1, so a batch with nothing supervised gives 0.0, never NaN (a count of 0 is
    accepted only for a call with nothing supervised).
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
            check, none extra (see ``wmss.loss.inputs.check_num_items``).
        softcap: final-logit soft-capping ``c * tanh(z / c)``, per model before mixing (Gemma 2/3).
        train_weak: False freezes the weak model: no gradient reaches ``weak_*``, and its gradient
            products are skipped.
        gap_threshold: gap masking. A supervised token with ``H_weak - H_strong < gap_threshold``
            is trained with plain strong cross-entropy and sends no gradient to the weak branch.
            None mixes every supervised token, as in the paper.
        return_stats: also return ``TokenStats`` (entropies, log-probs, the mixed mask).
        backend: "auto" (Triton on CUDA, "torch" there for float64 inputs; on CPUs the C++
            "native" engine where it builds, else "torch"), "triton", "torch", "native" or
            "reference" (the plain formula with materialised logits, for tests and debugging).

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
        TypeError, ValueError: naming the argument at fault (see ``wmss.loss.options`` and
            ``wmss.loss.inputs``).
        RuntimeError: from the backward, when run with ``create_graph=True`` on "torch" or
            "triton".
    """
    options = LossOptions(lam=lam, ignore_index=ignore_index, reduction=reduction,
                          softcap=softcap, train_weak=train_weak, gap_threshold=gap_threshold,
                          return_stats=return_stats, backend=backend)
    return fused_loss_with(options, ModelInputs(strong_hidden, strong_weight, strong_bias),
                           ModelInputs(weak_hidden, weak_weight, weak_bias), labels,
                           num_items_in_batch)


def fused_loss_with(options: LossOptions, strong: ModelInputs, weak: ModelInputs,
                    labels: torch.Tensor, num_items_in_batch=None):
    """``fused_loss`` with its options given as a checked ``LossOptions`` (what
    ``FusedWMSSLoss`` and ``WMSSPair`` call: their options were checked once, at construction).

    ``strong`` and ``weak``: each model's ``(hidden (..., d), weight (V, d), bias (V,) or None)``.
    """
    prepared = prepare_pair(strong, weak, labels, ignore_index=options.ignore_index,
                            reduction=options.reduction, train_weak=options.train_weak,
                            backend=options.backend, num_items_in_batch=num_items_in_batch)
    # The inputs are cast already; autocast must not recast the engines' products.
    with torch.autocast(prepared.labels.device.type, enabled=False):
        out = engines.engine(prepared.backend).mixed_loss(prepared.strong, prepared.weak,
                                                          prepared.labels, options.spec)
    supervised = prepared.labels != options.ignore_index
    loss = reduce_loss(out.loss, supervised, options.reduction, prepared.num_items_in_batch)
    if options.reduction == "none":
        loss = loss.reshape(prepared.shape)
    if not options.return_stats:
        return loss
    stats = TokenStats(out.entropy_strong, out.entropy_weak, out.logprob_strong,
                       out.logprob_weak, out.logprob_mix, out.mixed)
    return loss, stats.map(lambda t: t.reshape(prepared.shape))


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
        # Checked now, so a bad option fails at construction rather than at the first step.
        self.options = LossOptions(lam=lam, ignore_index=ignore_index, reduction=reduction,
                                   softcap=softcap, train_weak=train_weak,
                                   gap_threshold=gap_threshold, return_stats=return_stats,
                                   backend=backend)

    def forward(self, strong_hidden, strong_weight, weak_hidden, weak_weight, labels, *,
                strong_bias=None, weak_bias=None, num_items_in_batch=None):
        return fused_loss_with(self.options, ModelInputs(strong_hidden, strong_weight, strong_bias),
                               ModelInputs(weak_hidden, weak_weight, weak_bias), labels,
                               num_items_in_batch)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.as_kwargs().items())
