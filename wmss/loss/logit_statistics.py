"""``wmss.logit_stats``: per-token statistics of one model's logits, without its logits.

What the paper reads off a model's logits to show what WMSS changes (the "distractor" logits, the
non-target ones, fall): the target logit, the mean logit, the mean and the largest non-target
logit, the target's margin and rank, the entropy and the target log-probability, per token, in
one fused pass over the vocabulary (``wmss.loss.engines.contract.LogitTokenStats``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from .. import defaults
from ..validation import check_ignore_index
from . import engines
from .engines.contract import ModelInputs, has_logit_stats
from .inputs import prepare_model
from .options import check_softcap

# The engine used when the resolved one has no ``logit_stats`` (it is optional in the contract).
FALLBACK_ENGINE = "torch"


@dataclass(frozen=True)
class LogitStats:
    """Per-token statistics of ``z = softcap(hidden @ weight^T + bias)``, ``V`` logits per token.

    Every field has the shape of ``labels`` (of ``hidden`` without its last dimension); the
    floating fields are float32 (float64 for float64 inputs on the "torch" and "reference"
    backends), ``rank`` is int64. No field carries gradient. Every field is 0 at positions whose
    label is ``ignore_index``.

    Attributes:
        target_logit: ``z[y]``.
        mean_logit: ``sum_v z_v / V``, the mean over the whole vocabulary.
        mean_nontarget_logit: mean of the ``V - 1`` logits other than ``z[y]``.
        max_nontarget_logit: the largest of them.
        margin: ``target_logit - max_nontarget_logit`` (> 0: the target is the unique argmax).
        rank: how many non-target logits are strictly greater than ``z[y]`` (0: top-1; a tie
            does not count). Ties are decided at the precision of the computation (float32
            accumulation): logits that agree to float32 rounding may be ordered either way.
        entropy: of ``softmax(z)``, in nats.
        logprob: ``log softmax(z)[y]``.

    Without labels every position is scored and there is no target: ``target_logit``,
    ``margin``, ``rank`` and ``logprob`` are 0, and every logit is a non-target one
    (``mean_nontarget_logit == mean_logit``, ``max_nontarget_logit`` is the largest logit).
    With ``V = 1`` there is no non-target logit: ``mean_nontarget_logit``,
    ``max_nontarget_logit``, ``margin`` and ``rank`` are 0 at labelled positions.
    """

    target_logit: torch.Tensor
    mean_logit: torch.Tensor
    mean_nontarget_logit: torch.Tensor
    max_nontarget_logit: torch.Tensor
    margin: torch.Tensor
    rank: torch.Tensor
    entropy: torch.Tensor
    logprob: torch.Tensor

    def map(self, fn) -> "LogitStats":
        """A new ``LogitStats`` with ``fn`` applied to every field (e.g. a reshape)."""
        return LogitStats(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@torch.no_grad()
def logit_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    ignore_index: int = defaults.IGNORE_INDEX,
    backend: str = "auto",
) -> LogitStats:
    """Per-token ``LogitStats`` of ``softcap(hidden @ weight^T + bias)`` in one fused pass.

    Args:
        hidden: ``(..., d)`` final hidden states.
        weight: ``(V, d)`` lm-head weight; ``bias``: optional ``(V,)``.
        labels: optional ``(...)`` integer targets aligned with ``hidden`` (no shift inside);
            positions equal to ``ignore_index`` get 0 in every field. Without labels every
            position is scored with no target (see ``LogitStats``).
        softcap: final-logit soft-capping ``c * tanh(z / c)`` (Gemma 2/3).
        backend: "auto", "triton", "torch" or "reference", as for ``fused_loss``. An engine
            without ``logit_stats`` (it is optional in the engine contract) is replaced by the
            torch engine.

    Returns:
        ``LogitStats`` of ``(...)`` tensors, without gradient: float32 (float64 for float64
        inputs on "torch" and "reference"; "triton" refuses float64, "auto" picks "torch" for
        it), ``rank`` int64. The ``[tokens, V]`` logits are never materialised (except by
        ``backend="reference"``): the torch engine holds a few ``[256, 2048]`` blocks, the
        Triton kernels tiles in registers and O(N) partials. Inside ``torch.autocast`` the
        inputs are cast as for ``torch.nn.functional.linear``; the logits accumulate in float32.

    Raises:
        TypeError, ValueError: naming the argument at fault (see ``wmss.loss.inputs``).
    """
    softcap = check_softcap(softcap)
    ignore_index = check_ignore_index(ignore_index)
    prepared = prepare_model(ModelInputs(hidden, weight, bias), labels, ignore_index=ignore_index,
                             backend=backend)
    engine = engines.engine(prepared.backend)
    if not has_logit_stats(engine):
        engine = engines.engine(FALLBACK_ENGINE)
    # Without labels prepare_model makes placeholders; logit_stats has its own no-target meaning.
    flat_labels = None if labels is None else prepared.labels
    # The inputs are cast already; autocast must not recast the engines' products.
    with torch.autocast(prepared.model.hidden.device.type, enabled=False):
        stats = engine.logit_stats(prepared.model, flat_labels, softcap, prepared.ignore_index)
    return LogitStats(**stats._asdict()).map(lambda t: t.reshape(prepared.shape))
