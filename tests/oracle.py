"""The float64 ground truth every backend is checked against.

Written from docs/design.md section 1.1 alone and independently of ``wmss`` (which has its own
``reference`` backend, itself under test): full logits in float64, autograd for the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Truth:
    """Float64 per-token values (flat ``[N]``) and gradients of ``sum_n upstream_n * loss_n``."""

    loss: torch.Tensor
    entropy_strong: torch.Tensor
    entropy_weak: torch.Tensor
    logprob_strong: torch.Tensor
    logprob_weak: torch.Tensor
    logprob_mix: torch.Tensor
    mixed: torch.Tensor
    grads: dict


def _logits(h, w, b, softcap):
    z = h @ w.T
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


@dataclass(frozen=True)
class GapDecisions:
    """What the computation under test decided under gap masking, and from what: its ``mixed``
    mask and both models' entropies (any shape with one entry per token)."""

    mixed: torch.Tensor
    entropy_strong: torch.Tensor
    entropy_weak: torch.Tensor


def truth(inputs: dict, labels: torch.Tensor, *, lam: float = 0.5, softcap: Optional[float] = None,
          gap_threshold: Optional[float] = None, ignore_index: int = -100,
          upstream: Optional[torch.Tensor] = None, train_weak: bool = True,
          decisions: Optional[GapDecisions] = None) -> Truth:
    """Evaluate the mixed loss in float64.

    Args:
        inputs: ``strong_hidden``, ``strong_weight``, ``weak_hidden``, ``weak_weight`` and optionally
            ``strong_bias``/``weak_bias``; any dtype (upcast here), hidden states ``(..., d)``.
        labels: ``(...)`` targets.
        upstream: per-token weights of the loss whose gradients are returned (default: ones).
        decisions: under gap masking, the computation under test's decisions. A token whose
            float64 gap ``H_weak - H_strong`` lies within twice that computation's own entropy
            error on the token (``|dH_strong| + |dH_weak|``) of the threshold can fall either
            side in its precision (a float32 entropy near log V carries ~1e-6 of rounding), so
            the truth takes its decision there; every other token keeps the float64 decision,
            which the computation must then match exactly.
    """
    x = {k: v.detach().double().requires_grad_(not (k.startswith("weak") and not train_weak))
         for k, v in inputs.items() if v is not None}
    y = labels.reshape(-1)
    h_s = x["strong_hidden"].reshape(-1, x["strong_hidden"].shape[-1])
    h_w = x["weak_hidden"].reshape(-1, x["weak_hidden"].shape[-1])
    z_s = _logits(h_s, x["strong_weight"], x.get("strong_bias"), softcap)
    z_w = _logits(h_w, x["weak_weight"], x.get("weak_bias"), softcap)
    z_m = lam * z_s + (1 - lam) * z_w
    lp_s, lp_w, lp_m = (torch.log_softmax(z, dim=-1) for z in (z_s, z_w, z_m))
    supervised = y != ignore_index
    safe = torch.where(supervised, y, 0)[:, None]
    tok_s, tok_w, tok_m = (lp.gather(1, safe)[:, 0] for lp in (lp_s, lp_w, lp_m))
    ent_s = -(lp_s.exp() * lp_s).sum(-1)
    ent_w = -(lp_w.exp() * lp_w).sum(-1)
    mixed = supervised.clone()
    if gap_threshold is not None:
        gap = (ent_w - ent_s).detach()
        mixed &= gap >= gap_threshold
        if decisions is not None:
            mixed = torch.where(_ambiguous(decisions, ent_s, ent_w, gap, gap_threshold),
                                decisions.mixed.reshape(-1).to(mixed.device) & supervised, mixed)
    zero = torch.zeros((), dtype=torch.float64)
    loss = torch.where(mixed, -tok_m, torch.where(supervised, -tok_s, zero))
    weights = torch.ones_like(loss) if upstream is None else upstream.reshape(-1).double()
    (loss * weights).sum().backward()

    def masked(t):
        return torch.where(supervised, t, zero).detach()

    return Truth(loss.detach(), masked(ent_s), masked(ent_w), masked(tok_s), masked(tok_w),
                 masked(tok_m), mixed, {k: v.grad for k, v in x.items()})


def _ambiguous(decisions: GapDecisions, ent_s, ent_w, gap, threshold: float) -> torch.Tensor:
    """Tokens whose float64 gap is within twice the computed entropies' error of ``threshold``."""
    def error(got, exact):
        return (got.detach().reshape(-1).to(exact.device, torch.float64) - exact.detach()).abs()

    slack = 2 * (error(decisions.entropy_strong, ent_s) + error(decisions.entropy_weak, ent_w))
    return (gap - threshold).abs() <= slack


@dataclass
class LogitTruth:
    """Float64 per-token logit statistics of one model (flat ``[N]``), the fields of
    ``wmss.LogitStats``; ``rank`` int64. ``logits`` and ``targets`` are kept for ``rank_range``."""

    target_logit: torch.Tensor
    mean_logit: torch.Tensor
    mean_nontarget_logit: torch.Tensor
    max_nontarget_logit: torch.Tensor
    margin: torch.Tensor
    rank: torch.Tensor
    entropy: torch.Tensor
    logprob: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor  # [N] label column, -1 where there is none

    def rank_range(self, slack: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)``: the ranks if every non-target logit within ``slack`` (a number, or one
        per token) of the target's counted as below it, and as above it (what a computation whose
        logits carry an error up to ``slack / 2`` may return)."""
        z, y = self.logits, self.targets
        slack = torch.as_tensor(slack, dtype=torch.float64).reshape(-1, 1)
        has = y >= 0
        z_y = z.gather(1, y.clamp_min(0)[:, None])
        other = torch.ones_like(z, dtype=torch.bool).scatter_(1, y.clamp_min(0)[:, None],
                                                               ~has[:, None])
        low = ((z > z_y + slack) & other).sum(1)
        high = ((z >= z_y - slack) & other).sum(1)
        keep = has & (other.sum(1) > 0)
        return torch.where(keep, low, 0), torch.where(keep, high, 0)


def logit_truth(hidden, weight, labels=None, *, bias=None, softcap: Optional[float] = None,
                ignore_index: int = -100) -> LogitTruth:
    """The statistics of ``wmss.logit_stats`` in float64, from the full logits.

    Per token with logits ``z`` (``V`` of them) and target ``y``: ``z[y]``, the mean of ``z``,
    the mean and max of ``z`` without the column ``y``, the margin ``z[y] - max``, the count of
    other columns with ``z_v > z[y]``, the entropy and ``log softmax(z)[y]``. Ignored positions:
    0 everywhere. No labels: no target (target fields 0, every column non-target). ``V = 1``
    with a target: no non-target column (those fields 0).
    """
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    z = _logits(h, weight.detach().double(), None if bias is None else bias.detach().double(),
                softcap)
    n, vocab = z.shape
    if labels is None:
        scored = torch.ones(n, dtype=torch.bool)
        y = torch.full((n,), -1, dtype=torch.long)
    else:
        flat = labels.reshape(-1).long().cpu()
        scored = flat != ignore_index
        y = torch.where(scored, flat, -1)
    z = z.cpu()
    has = y >= 0
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    targets, target_logp, others_mean, others_max, above = [], [], [], [], []
    for i in range(n):  # row by row: plain, and independent of the library's vectorised masks
        row = z[i]
        if has[i]:
            others = torch.cat([row[:y[i]], row[y[i] + 1:]])
            targets.append(row[y[i]])
            target_logp.append(logp[i, y[i]])
        else:
            others = row
            targets.append(zero)
            target_logp.append(zero)
        others_mean.append(others.mean() if len(others) else zero)
        others_max.append(others.max() if len(others) else zero)
        above.append(int((others > row[y[i]]).sum()) if has[i] and len(others) else 0)
    target = torch.stack(targets)
    mean_nt, max_nt = torch.stack(others_mean), torch.stack(others_max)
    with_others = scored & ((vocab - has.long()) > 0)
    both = has & with_others

    def where(mask, x):
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype))

    return LogitTruth(
        target_logit=where(has, target), mean_logit=where(scored, z.mean(1)),
        mean_nontarget_logit=where(with_others, mean_nt),
        max_nontarget_logit=where(with_others, max_nt),
        margin=where(both, target - max_nt), rank=where(both, torch.tensor(above)),
        entropy=where(scored, entropy), logprob=where(has, torch.stack(target_logp)),
        logits=z, targets=y)
