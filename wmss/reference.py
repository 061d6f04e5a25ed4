"""The ``reference`` backend: SPEC section 2 written plainly, with the full logits in memory.

For tests and debugging only: it materialises ``[N, V]`` logits of both models (and autograd
keeps more), in float32, or float64 for float64 inputs. Gradients come from autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from wmss_kernels.results import MixedTokenStats, SingleTokenStats

from .validation import MixedLossSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           softcap: Optional[float]) -> torch.Tensor:
    """``softcap(hidden @ weight^T + bias)`` upcast to the compute dtype: ``[N, V]``."""
    dtype = compute_dtype(hidden.dtype)
    z = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(-1)


def mixed_loss(strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias,
               labels: torch.Tensor, spec: MixedLossSpec) -> MixedTokenStats:
    """Per-token mixed loss (differentiable) and statistics; inputs are flat ``[N, d]``/``[N]``."""
    z_s = logits(strong_hidden, strong_weight, strong_bias, spec.softcap)
    z_w = logits(weak_hidden, weak_weight, weak_bias, spec.softcap)
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
        return torch.where(supervised, x.detach(), zero).float()

    max_s, max_m = z_s.detach().amax(-1), z_m.detach().amax(-1)
    return MixedTokenStats(
        loss=loss.float(), max_strong=max_s.float(),
        logsum_strong=(z_s.detach() - max_s[:, None]).logsumexp(-1).float(), max_mix=max_m.float(),
        logsum_mix=(z_m.detach() - max_m[:, None]).logsumexp(-1).float(), entropy_strong=stat(h_s),
        entropy_weak=stat(h_w), logprob_strong=stat(tok_s), logprob_weak=stat(tok_w),
        logprob_mix=stat(tok_m), mixed=mixed,
    )


@torch.no_grad()
def single_stats(hidden, weight, bias, labels: torch.Tensor, softcap: Optional[float],
                 ignore_index: int) -> SingleTokenStats:
    """Entropy, log-sum-exp and target log-prob of one model; 0 where ``labels == ignore_index``."""
    z = logits(hidden, weight, bias, softcap)
    log_probs = z.log_softmax(-1)
    supervised = labels != ignore_index
    target = labels.clamp(0, z.shape[-1] - 1).unsqueeze(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return SingleTokenStats(
        entropy=torch.where(supervised, _entropy(log_probs), zero).float(),
        lse=z.logsumexp(-1).float(),
        logprob=torch.where(supervised, log_probs.gather(-1, target).squeeze(-1), zero).float(),
    )
