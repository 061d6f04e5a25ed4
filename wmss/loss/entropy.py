"""``wmss.token_entropy``: per-token next-token entropy of one model, without its logits."""

from __future__ import annotations

from typing import Optional

import torch

from .. import defaults
from ..validation import check_ignore_index
from . import engines
from .engines.contract import ModelInputs
from .inputs import prepare_model
from .options import check_softcap


@torch.no_grad()
def token_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    ignore_index: int = defaults.IGNORE_INDEX,
    backend: str = "auto",
) -> torch.Tensor:
    """Entropy (nats) of ``softmax(softcap(hidden @ weight^T + bias))`` at every position.

    Args:
        hidden: ``(..., d)`` final hidden states.
        weight: ``(V, d)`` lm-head weight; ``bias``: optional ``(V,)``.
        labels: optional ``(...)`` integer labels aligned with ``hidden``; positions equal to
            ``ignore_index`` get 0. Without labels every position is scored.
        softcap: final-logit soft-capping ``c * tanh(z / c)`` (Gemma 2/3).
        backend: "auto", "triton", "torch" or "reference", as for ``fused_loss``.

    Returns:
        ``(...)`` entropies without gradient: float32, or float64 for float64 inputs (backends
        "torch" and "reference"; ``backend="triton"`` refuses float64 with a ValueError, "auto"
        picks "torch" for it). The ``[tokens, V]`` logits are never materialised (except by
        ``backend="reference"``). Inside ``torch.autocast`` the inputs are cast as for
        ``torch.nn.functional.linear`` and the logits accumulate in float32, as outside it.

    Raises:
        TypeError, ValueError: naming the argument at fault (see ``wmss.loss.inputs``).
    """
    softcap = check_softcap(softcap)
    ignore_index = check_ignore_index(ignore_index)
    prepared = prepare_model(ModelInputs(hidden, weight, bias), labels, ignore_index=ignore_index,
                             backend=backend)
    # The inputs are cast already; autocast must not recast the engines' products.
    with torch.autocast(prepared.labels.device.type, enabled=False):
        stats = engines.engine(prepared.backend).single_stats(
            prepared.model, prepared.labels, softcap, prepared.ignore_index)
    return stats.entropy.reshape(prepared.shape)
