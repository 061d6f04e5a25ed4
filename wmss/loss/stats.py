"""``TokenStats``: the per-token statistics the fused pass returns next to the loss."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of the strong, weak and mixed next-token distributions.

    Every field has the shape of ``labels``. Float fields are float32 (float64 when either model's
    inputs are float64) and hold 0 at ignored positions; ``mixed`` is bool and False there. None
    of them carries gradient.

    Attributes:
        entropy_strong: entropy of softmax(z_strong), in nats.
        entropy_weak: entropy of softmax(z_weak), in nats.
        logprob_strong: log softmax(z_strong)[y]; ``-logprob_strong`` is plain strong CE.
        logprob_weak: log softmax(z_weak)[y].
        logprob_mix: log softmax(z_mix)[y]; the mixed loss is ``-logprob_mix`` where ``mixed``.
        mixed: the token was trained with the mixed loss (supervised and, under gap masking,
            ``entropy_weak - entropy_strong >= gap_threshold``).
    """

    entropy_strong: torch.Tensor
    entropy_weak: torch.Tensor
    logprob_strong: torch.Tensor
    logprob_weak: torch.Tensor
    logprob_mix: torch.Tensor
    mixed: torch.Tensor

    def map(self, fn) -> "TokenStats":
        """A new ``TokenStats`` with ``fn`` applied to every field (e.g. a reshape)."""
        return TokenStats(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})
