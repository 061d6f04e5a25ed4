"""``inspect_models``: the means of ``wmss.logit_stats`` over a data set's supervised tokens.

For one model, or a strong/weak pair and their mixture ``z_mix = lam z_s + (1 - lam) z_w``: the
statistics the paper reads to show what WMSS changes (the mean non-target, "distractor", logit
falls while the target's margin grows). ``wmss inspect`` prints them; the pipeline records them
for every model it produces (``wmss.recipe.pipeline``).

Batches run through each model's backbone as for WD-DS scoring (``wmss.recipe.selection``, whose
batching and checks are reused); ``wmss.logit_stats`` folds the final hidden states with the lm
head, so no ``[tokens, vocab]`` logits exist (except with ``backend="reference"``).

**The mixture as one linear head.** Without a soft-cap, ``z_mix`` is the logit of one linear
head over the concatenated hidden states::

    z_mix = [lam h_s, (1 - lam) h_w] @ [W_s, W_w]^T + (lam b_s + (1 - lam) b_w)

(a missing bias counts as 0; a head's logit scale is folded into its hidden states and bias
first), so the mixture's statistics come from the same fused pass, exactly, at the cost of one
``[V, d_s + d_w]`` copy of the two weights. Soft-capped heads mix capped logits, which no linear
head gives: they are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import nn

from ..defaults import IGNORE_INDEX, LAMBDA
from ..hf import models as hf
from ..loss import LogitStats, logit_stats
from ..loss.engines import BACKENDS
from ..loss.options import check_lam
from ..validation import check_choice, check_ignore_index, check_int
from .selection.catalog import _catalog
from .selection.scoring import _batch_tensors, _check_vocabulary, _device, _evaluating

__all__ = ["STATISTICS", "format_table", "inspect_models"]

#: The statistics whose means are reported, in ``LogitStats`` order.
STATISTICS = LogitStats.field_names()


class _MixtureHead:
    """The mixture of two linear heads as one (module doc)."""

    def __init__(self, strong: hf.LMHead, weak: hf.LMHead, lam: float):
        for name, head in (("strong", strong), ("weak", weak)):
            if head.softcap is not None:
                raise ValueError(
                    f"the {name} model soft-caps its logits (final_logit_softcapping="
                    f"{head.softcap:g}): the mixture of capped logits is no linear head, so its "
                    "statistics cannot be computed this way; inspect each model alone")
        if strong.vocab_size != weak.vocab_size:
            raise ValueError(f"the strong model has {strong.vocab_size} lm-head outputs but "
                             f"the weak one {weak.vocab_size}; they must share a vocabulary")
        self.strong, self.weak, self.lam = strong, weak, lam
        self.dtype = torch.promote_types(strong.weight.dtype, weak.weight.dtype)
        self.device = strong.weight.device
        self.weight = torch.cat([strong.weight.detach().to(self.device, self.dtype),
                                 weak.weight.detach().to(self.device, self.dtype)], dim=1)

    def mixed_inputs(self, strong_hidden: torch.Tensor, weak_hidden: torch.Tensor):
        parts, biases = [], []
        for head, hidden, weight in ((self.strong, strong_hidden, self.lam),
                                     (self.weak, weak_hidden, 1.0 - self.lam)):
            hidden, _, bias = head.model_inputs(hidden.to(self.device, self.dtype))
            parts.append(hidden * weight)
            if bias is not None:
                biases.append(bias.to(self.device, self.dtype) * weight)
        bias = None if not biases else sum(biases)
        return torch.cat(parts, dim=-1), self.weight, bias, None


def _means(sums: dict, tokens: int) -> dict:
    return {name: (value / tokens if tokens else 0.0) for name, value in sums.items()}


def inspect_models(strong_model: nn.Module, dataset: Sequence[Mapping], *,
                   weak_model: Optional[nn.Module] = None, lam: float = LAMBDA,
                   batch_size: int = 8, pad_token_id: int = 0, backend: str = "auto",
                   ignore_index: int = IGNORE_INDEX) -> dict:
    """The means of every ``wmss.LogitStats`` field over the data set's supervised targets.

    Args:
        strong_model: a Hugging Face causal LM (see ``wmss.hf.models.LMHead`` for the heads
            supported); run in eval mode without gradients, its training mode restored after.
        dataset: ``{"input_ids", "labels"}`` examples as ``wmss.recipe.data.encode_records``
            returns them (labels aligned with input_ids; the Hugging Face shift is applied).
        weak_model: optional second model sharing the tokenizer and vocabulary; then the weak
            model's means and those of the mixture ``lam z_s + (1 - lam) z_w`` are reported too
            (soft-capped heads are refused for the mixture, see the module doc).
        lam: the mixture's weight in [0, 1].
        batch_size: examples per forward pass; pad_token_id: right-padding id (never scored).
        backend: ``wmss.logit_stats`` backend.

    Returns:
        A JSON-ready dict: ``examples``, ``supervised_tokens``, ``lam`` (None without a weak
        model) and ``means``: ``{"strong": {statistic: mean}}``, with ``"weak"`` and ``"mix"``
        beside it given a weak model. Means are float64 sums divided by the count of supervised
        tokens (0.0 everywhere when there is none); ``rank``'s is the mean rank.

    Raises:
        TypeError, ValueError: a bad argument or data set, token ids outside a model's
            vocabulary, soft-capped heads with a weak model, or non-finite statistics (e.g.
            float16 overflow).
    """
    batch_size = check_int("batch_size", batch_size, 1)
    pad_token_id = check_int("pad_token_id", pad_token_id, 0)
    ignore_index = check_ignore_index(ignore_index)
    check_choice("backend", backend, BACKENDS)
    models = {"strong": strong_model} if weak_model is None else {"strong": strong_model,
                                                                    "weak": weak_model}
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}_model must be a torch.nn.Module (a Hugging Face causal LM), "
                            f"got {type(model).__name__}")
    lam = None if weak_model is None else check_lam(lam)
    catalog = _catalog(dataset, ignore_index)
    heads = {name: hf.LMHead.of(model) for name, model in models.items()}
    for name, model in models.items():
        _check_vocabulary(f"{name}_model", model, heads[name], catalog)
    mixture = None if weak_model is None else _MixtureHead(heads["strong"], heads["weak"], lam)
    names = [*models, *(["mix"] if mixture is not None else [])]
    sums = {name: dict.fromkeys(STATISTICS, 0.0) for name in names}

    # Only examples with a supervised target are run, longest first (little padding).
    order = sorted((i for i, count in enumerate(catalog.tokens) if count),
                   key=lambda i: -catalog.lengths[i])
    with _evaluating(*models.values()):
        for start in range(0, len(order), batch_size):
            batch = _batch_tensors(dataset, order[start:start + batch_size], pad_token_id,
                                   ignore_index)
            hidden = {}
            for name, model in models.items():
                device = _device(model)
                hidden[name] = hf.final_hidden_states(model, batch["input_ids"].to(device),
                                                      batch["attention_mask"].to(device))
            inputs = {}
            for name in models:
                head = heads[name]
                model_inputs = head.model_inputs(hidden[name].to(head.weight.device,
                                                                 head.weight.dtype))
                inputs[name] = (*model_inputs, head.softcap)
            if mixture is not None:
                inputs["mix"] = mixture.mixed_inputs(hidden["strong"], hidden["weak"])
            for name, (h, weight, bias, softcap) in inputs.items():
                stats = logit_stats(h, weight, batch["targets"].to(weight.device), bias=bias,
                                    softcap=softcap, ignore_index=ignore_index, backend=backend)
                for field in STATISTICS:  # 0 at ignored positions: plain sums
                    sums[name][field] += float(getattr(stats, field).double().sum())
    tokens = sum(catalog.tokens)
    means = {name: _means(sums[name], tokens) for name in names}
    for name, values in means.items():
        bad = [field for field, value in values.items() if not math.isfinite(value)]
        if bad:
            raise ValueError(f"the {name} statistics {bad} are not finite; in float16 this is "
                             "usually overflow (load the model in bfloat16 or float32)")
    return {"examples": len(catalog.lengths), "supervised_tokens": tokens, "lam": lam,
            "means": means}


def format_table(result: dict) -> str:
    """``inspect_models``'s means as a text table: one row per statistic, one column per model."""
    means = result["means"]
    columns = list(means)
    width = max(len(name) for name in STATISTICS)
    header = f"{'statistic':<{width}}" + "".join(f"{name:>12}" for name in columns)
    rows = [f"{name:<{width}}" + "".join(f"{means[c][name]:>12.4f}" for c in columns)
            for name in STATISTICS]
    mix = f", mix = {result['lam']:g} strong + {1 - result['lam']:g} weak" if "mix" in means \
        else ""
    footer = (f"means over {result['supervised_tokens']} supervised tokens of "
              f"{result['examples']} examples{mix}")
    return "\n".join([header, *rows, footer])
