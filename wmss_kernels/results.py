"""Result and request types of the launchers: plain PyTorch, shared with the ``torch`` backend."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class MixedTokenStats(NamedTuple):
    """Per-token forward outputs of the mixed loss; float32 ``[N]`` unless noted (float64 when
    the torch backend computes a float64 pair).

    ``loss`` and the ``entropy_*``/``logprob_*`` statistics are 0 at ignored positions;
    ``mixed`` is bool (the token used the mixed loss).

    The log-sum-exp of the strong and of the mixed logits, which the backward needs, is kept as
    the pair ``(max_*, logsum_*)`` with ``lse = max + logsum``: a single float32 ``lse`` near
    |z| ~ 1e4 carries an absolute error of ~5e-4, and ``softmax = exp((z - max) - logsum)`` would
    inherit it; the pair keeps float32's relative precision at any logit offset.
    """

    loss: torch.Tensor
    max_strong: torch.Tensor
    logsum_strong: torch.Tensor
    max_mix: torch.Tensor
    logsum_mix: torch.Tensor
    entropy_strong: torch.Tensor
    entropy_weak: torch.Tensor
    logprob_strong: torch.Tensor
    logprob_weak: torch.Tensor
    logprob_mix: torch.Tensor
    mixed: torch.Tensor


class SingleTokenStats(NamedTuple):
    """Per-token statistics of one model: float32 ``[N]`` (float64 for float64 inputs on the
    torch backend); entropy and logprob 0 where ignored."""

    entropy: torch.Tensor
    lse: torch.Tensor
    logprob: torch.Tensor


class GradRequest(NamedTuple):
    """Which of one model's gradients to compute (``needs_input_grad`` of hidden, weight, bias)."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


class ModelGrads(NamedTuple):
    """One model's gradients; an entry is None when it was not requested.

    Each is either in its input's dtype or a float32 accumulator (the Triton launcher returns
    ``hidden`` and ``weight`` in the inputs' dtypes and ``bias`` in float32; the ``torch`` engine
    returns float32 accumulators): the autograd layer casts them to the inputs' dtypes.
    """

    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
