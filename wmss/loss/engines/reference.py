"""The ``reference`` engine: docs/design.md section 1.1 written plainly, logits in memory.

For tests and debugging only: it materialises ``[N, V]`` logits of both models (and autograd
keeps more), in float32, or float64 when either model is float64. Gradients come from autograd,
to any order (double backward included). It implements the ``Engine`` contract as the fused
engines do, so the public layer treats it like them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .contract import (
    FLOAT_DTYPES,
    LogitTokenStats,
    MixedLossSpec,
    MixedTokenStats,
    ModelInputs,
    SingleTokenStats,
    compute_dtype,
)


def logits(model: ModelInputs, softcap: Optional[float],
           dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``softcap(hidden @ weight^T + bias)`` upcast to ``dtype`` (default: the compute dtype of
    the model's inputs): ``[N, V]``."""
    dtype = compute_dtype(model.dtype) if dtype is None else dtype
    hidden, weight, bias = model.map(lambda t: t.to(dtype))
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(-1)


def mixed_loss(strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
               spec: MixedLossSpec) -> MixedTokenStats:
    """Per-token mixed loss (differentiable) and statistics; inputs are flat ``[N, d]``/``[N]``.

    Both models' logits are computed in ``compute_dtype`` of the pair's dtypes, as are the results.
    """
    dtype = compute_dtype(strong.dtype, weak.dtype)
    z_s = logits(strong, spec.softcap, dtype)
    z_w = logits(weak, spec.softcap, dtype)
    z_m = spec.lam * z_s + (1.0 - spec.lam) * z_w
    logp_s, logp_w, logp_m = (z.log_softmax(-1) for z in (z_s, z_w, z_m))

    supervised = labels != spec.ignore_index
    target = labels.clamp(0, z_s.shape[-1] - 1).unsqueeze(-1)
    tok_s, tok_w, tok_m = (lp.gather(-1, target).squeeze(-1) for lp in (logp_s, logp_w, logp_m))
    with torch.no_grad():
        h_s, h_w = _entropy(logp_s), _entropy(logp_w)
        mixed = supervised.clone()
        if spec.gap_threshold is not None:
            mixed &= (h_w - h_s) >= spec.gap_threshold
    zero = torch.zeros((), dtype=tok_s.dtype, device=tok_s.device)
    loss = torch.where(mixed, -tok_m, torch.where(supervised, -tok_s, zero))

    def stat(x):
        return torch.where(supervised, x.detach(), zero)

    max_s, max_m = z_s.detach().amax(-1), z_m.detach().amax(-1)
    return MixedTokenStats(
        loss=loss, max_strong=max_s, logsum_strong=(z_s.detach() - max_s[:, None]).logsumexp(-1),
        max_mix=max_m, logsum_mix=(z_m.detach() - max_m[:, None]).logsumexp(-1),
        entropy_strong=stat(h_s), entropy_weak=stat(h_w), logprob_strong=stat(tok_s),
        logprob_weak=stat(tok_w), logprob_mix=stat(tok_m), mixed=mixed,
    )


@torch.no_grad()
def single_stats(model: ModelInputs, labels: torch.Tensor, softcap: Optional[float],
                 ignore_index: int) -> SingleTokenStats:
    """Entropy, log-sum-exp and target log-prob of one model; 0 where ``labels == ignore_index``.

    In the compute dtype of the model's inputs (float32, or float64).
    """
    z = logits(model, softcap)
    log_probs = z.log_softmax(-1)
    supervised = labels != ignore_index
    target = labels.clamp(0, z.shape[-1] - 1).unsqueeze(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return SingleTokenStats(
        entropy=torch.where(supervised, _entropy(log_probs), zero),
        lse=z.logsumexp(-1),
        logprob=torch.where(supervised, log_probs.gather(-1, target).squeeze(-1), zero),
    )


@torch.no_grad()
def logit_stats(model: ModelInputs, labels: Optional[torch.Tensor], softcap: Optional[float],
                ignore_index: int) -> LogitTokenStats:
    """``LogitTokenStats`` (see there for every field's meaning) from the full ``[N, V]`` logits,
    in the compute dtype of the model's inputs; ``labels`` ``[N]`` int64 or None (no targets)."""
    z = logits(model, softcap)
    num_tokens, vocab = z.shape
    if labels is None:
        scored = torch.ones(num_tokens, dtype=torch.bool, device=z.device)
        has_target = torch.zeros_like(scored)
        y = torch.zeros(num_tokens, dtype=torch.long, device=z.device)
    else:
        scored = has_target = labels != ignore_index
        y = torch.where(has_target, labels, 0)
    onehot = torch.zeros_like(z, dtype=torch.bool).scatter_(1, y[:, None], has_target[:, None])
    target = z.gather(1, y[:, None]).squeeze(1)
    nontarget_count = vocab - has_target.to(torch.long)
    has_nontarget = scored & (nontarget_count > 0)
    both = has_target & has_nontarget
    max_nontarget = z.masked_fill(onehot, -torch.inf).amax(1)
    mean_nontarget = z.masked_fill(onehot, 0.0).sum(1) / nontarget_count.clamp_min(1)
    rank = ((z > target[:, None]) & ~onehot).sum(1)
    log_probs = z.log_softmax(-1)

    def where(mask, x):
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))

    return LogitTokenStats(
        target_logit=where(has_target, target),
        mean_logit=where(scored, z.mean(1)),
        mean_nontarget_logit=where(has_nontarget, mean_nontarget),
        max_nontarget_logit=where(has_nontarget, max_nontarget),
        # -inf (no non-target column) only where ``both`` is False: never kept.
        margin=where(both, target - max_nontarget),
        rank=where(both, rank),
        entropy=where(scored, _entropy(log_probs)),
        logprob=where(has_target, log_probs.gather(1, y[:, None]).squeeze(1)),
    )


class ReferenceEngine:
    """``mixed_loss``, ``single_stats`` and ``logit_stats`` above, as an ``Engine``."""

    supported_dtypes = FLOAT_DTYPES

    def mixed_loss(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                   spec: MixedLossSpec) -> MixedTokenStats:
        return mixed_loss(strong, weak, labels, spec)

    def single_stats(self, model: ModelInputs, labels: torch.Tensor, softcap: Optional[float],
                     ignore_index: int) -> SingleTokenStats:
        return single_stats(model, labels, softcap, ignore_index)

    def logit_stats(self, model: ModelInputs, labels: Optional[torch.Tensor],
                    softcap: Optional[float], ignore_index: int) -> LogitTokenStats:
        return logit_stats(model, labels, softcap, ignore_index)
