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


def truth(inputs: dict, labels: torch.Tensor, *, lam: float = 0.5, softcap: Optional[float] = None,
          gap_threshold: Optional[float] = None, ignore_index: int = -100,
          upstream: Optional[torch.Tensor] = None, train_weak: bool = True) -> Truth:
    """Evaluate the mixed loss in float64.

    Args:
        inputs: ``strong_hidden``, ``strong_weight``, ``weak_hidden``, ``weak_weight`` and optionally
            ``strong_bias``/``weak_bias``; any dtype (upcast here), hidden states ``(..., d)``.
        labels: ``(...)`` targets.
        upstream: per-token weights of the loss whose gradients are returned (default: ones).
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
        mixed &= (ent_w - ent_s).detach() >= gap_threshold
    zero = torch.zeros((), dtype=torch.float64)
    loss = torch.where(mixed, -tok_m, torch.where(supervised, -tok_s, zero))
    weights = torch.ones_like(loss) if upstream is None else upstream.reshape(-1).double()
    (loss * weights).sum().backward()

    def masked(t):
        return torch.where(supervised, t, zero).detach()

    return Truth(loss.detach(), masked(ent_s), masked(ent_w), masked(tok_s), masked(tok_w),
                 masked(tok_m), mixed, {k: v.grad for k, v in x.items()})
