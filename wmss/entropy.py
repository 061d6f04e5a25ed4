"""``wmss.token_entropy``: per-token next-token entropy of one model, without its logits."""

from __future__ import annotations

from typing import Optional

import torch

from . import backends, defaults, reference
from .loss import autocast_dtype, cast_for_autocast
from .validation import (
    check_head,
    check_ignore_index,
    check_labels,
    check_pair_dtypes,
    check_same_device,
    check_softcap,
)


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
        TypeError, ValueError: naming the argument at fault (see ``wmss.validation``).
    """
    softcap = check_softcap(softcap)
    ignore_index = check_ignore_index(ignore_index)
    check_head("", hidden, weight, bias)
    device = check_same_device({"hidden": hidden, "weight": weight, "bias": bias,
                                "labels": labels})
    shape = hidden.shape[:-1]
    if labels is None:
        # Score every position: placeholder labels that are never ignored (they only feed the
        # target log-probs, which are discarded here).
        labels, ignore_index = torch.zeros(shape, device=device, dtype=torch.long), -1
    else:
        labels = check_labels(labels, shape, weight.shape[0], ignore_index)
    named = cast_for_autocast(device, {"hidden": hidden, "weight": weight, "bias": bias})
    check_pair_dtypes("", *named.values(), under_autocast=autocast_dtype(device) is not None)
    hidden, weight, bias = named.values()
    backend = backends.resolve(backend, device, [("hidden", hidden.dtype)])
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    # The inputs are cast already; autocast must not recast the engines' products.
    with torch.autocast(device.type, enabled=False):
        if backend == "reference":
            stats = reference.single_stats(flat_hidden, weight, bias, flat_labels, softcap,
                                           ignore_index)
        else:
            stats = backends.engine(backend).single_forward(flat_hidden, weight, bias,
                                                            flat_labels, softcap, ignore_index)
    return stats.entropy.reshape(shape)
