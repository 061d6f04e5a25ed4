"""The checks and preparation of the fused loss's tensors: every error names the argument.

``prepare_pair`` and ``prepare_model`` turn what a user passes to ``fused_loss`` and
``token_entropy`` into what an engine takes (``wmss.loss.engines.contract``): checked, cast as
under ``torch.autocast``, flattened to ``ModelInputs`` with ``[N, d]`` hidden states, and the
backend resolved. Bad input fails here, never as a NaN, a hang or a crash inside a kernel.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple, Optional

import torch

from ..validation import INT64_MAX
from . import engines
from .engines.contract import FLOAT_DTYPES, ModelInputs

# The label-range check costs one host-device synchronisation per call on CUDA (the same sync
# also checks the value of a ``num_items_in_batch`` tensor on the device); set this environment
# variable to 1 to skip both (out-of-range labels then give undefined losses, and a device
# ``num_items_in_batch`` is divided by as given).
SKIP_LABEL_CHECK_ENV = "WMSS_SKIP_LABEL_CHECK"
COMPILED_CHECK_MESSAGE = (
    "wmss.fused_loss (compiled): labels must lie in [0, V) or equal ignore_index, and "
    "num_items_in_batch must be a count >= 0 that is 0 only when nothing is supervised; run "
    "the step uncompiled for the argument and the values at fault")


NUM_ITEMS_MEANING = "the count of supervised tokens that reduction='mean' divides by"


def check_num_items(num_items_in_batch, reduction: str):
    """``num_items_in_batch``: None, or the count that ``reduction="mean"`` divides the sum by.

    Accepted: a Python integer (or a float with a whole value) >= 0, or a one-element tensor,
    integer (value >= 0) or floating (finite and >= 0: Hugging Face Trainer passes the count as a
    float tensor divided by the number of ranks that share a batch, which need not be whole).
    bool, complex and meta tensors are refused. A count of 0 (an accumulated batch with no
    supervised token, which training on masked data can meet) is accepted only when this call
    has no supervised token either: its loss is then 0 (``check_labels`` checks this).

    A tensor on the CPU is checked here. The value of a tensor on an accelerator is not read
    here (that would be a host sync): ``check_labels(num_items=...)`` checks it in the host sync of
    the label-range check, so a bad value still raises, at no extra cost (and is not checked when
    ``WMSS_SKIP_LABEL_CHECK=1`` skips that sync).

    Returns:
        None, an ``int``, or the tensor.
    """
    if num_items_in_batch is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch replaces the denominator of reduction='mean'; "
                         f"it cannot be combined with reduction={reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        count = num_items_in_batch
        if count.dtype == torch.bool or count.is_complex():
            raise TypeError(f"num_items_in_batch ({NUM_ITEMS_MEANING}) must be an integer or "
                            f"floating tensor, got {count.dtype}")
        if count.numel() != 1:
            raise ValueError("num_items_in_batch must be a number or a one-element tensor, got a "
                             f"tensor of shape {tuple(count.shape)}")
        if count.is_meta:
            raise ValueError("num_items_in_batch is on meta (a meta tensor has no value)")
        if readable_without_sync(count) and bool(count_is_invalid(count)):
            raise ValueError(_bad_count_message(count))
        return count
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError("num_items_in_batch must be an int, a one-element tensor or None, got "
                        f"{type(num_items_in_batch).__name__}")
    value = float(num_items_in_batch)
    if not (math.isfinite(value) and 0 <= value <= INT64_MAX and value == math.floor(value)):
        raise ValueError(f"num_items_in_batch ({NUM_ITEMS_MEANING}) must be a whole number >= 0, "
                         f"got {num_items_in_batch!r}")
    return int(num_items_in_batch)


def readable_without_sync(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read on the host now: on the CPU and not while
    ``torch.compile`` traces (a value read there would be a data-dependent branch)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def count_is_invalid(count: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on ``count``'s device (no host sync): a one-element ``num_items_in_batch``
    tensor that ``check_num_items`` would refuse for its value."""
    count = count.reshape(())
    if count.is_floating_point():
        return ~(torch.isfinite(count) & (count >= 0))
    return count < 0


def _bad_count_message(count: torch.Tensor) -> str:
    rule = "finite and >= 0" if count.is_floating_point() else ">= 0"
    return (f"num_items_in_batch ({NUM_ITEMS_MEANING}) must be {rule}, got a {count.dtype} "
            f"tensor holding {count.item()}")


def check_tensor(name: str, value, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or "
                        f"float64), got {value.dtype}")
    return value


def check_head(prefix: str, hidden, weight, bias) -> None:
    """One model's hidden states ``(..., d)``, lm-head weight ``(V, d)`` and optional bias ``(V,)``.

    ``prefix`` is prepended to the argument names in messages ("strong_", "weak_" or "").
    """
    check_tensor(f"{prefix}hidden", hidden)
    check_tensor(f"{prefix}weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden must have at least one dimension (..., d)")
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be 2-D (V, d), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}weight has hidden size {weight.shape[1]} but {prefix}hidden "
                         f"has {hidden.shape[-1]} (shapes {tuple(weight.shape)} and "
                         f"{tuple(hidden.shape)})")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight has an empty vocabulary")
    if weight.shape[1] == 0:
        raise ValueError(f"{prefix}hidden and {prefix}weight have hidden size 0 (shapes "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}); d must be >= 1")
    if bias is not None:
        check_tensor(f"{prefix}bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must have shape ({weight.shape[0]},) to match "
                             f"{prefix}weight, got {tuple(bias.shape)}")


def check_same_device(named: dict) -> torch.device:
    """The one device of the tensors in ``named`` (None entries skipped); every entry must be a
    tensor with values (not on meta)."""
    for name, t in named.items():
        if t is not None:
            check_tensor(name, t, floating=False)
            if t.is_meta:
                raise ValueError(f"{name} is on meta (a meta tensor has a shape but no values "
                                 "to compute with)")
    devices = {name: t.device for name, t in named.items() if t is not None}
    first_name, device = next(iter(devices.items()))
    for name, other in devices.items():
        if other != device:
            raise ValueError(f"{name} is on {other} but {first_name} is on {device}; all inputs "
                             "must be on one device")
    return device


def check_pair_dtypes(prefix: str, hidden, weight, bias, under_autocast: bool = False) -> None:
    """As for ``torch.nn.functional.linear``, a model's tensors share a dtype (after autocast's
    casts, when ``under_autocast``)."""
    if hidden.dtype != weight.dtype:
        hint = ("torch.autocast does not cast float64 tensors, as for torch.nn.functional.linear"
                if under_autocast else "pass matching dtypes or run under torch.autocast")
        raise ValueError(f"{prefix}hidden is {hidden.dtype} but {prefix}weight is "
                         f"{weight.dtype}; {hint}")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"{prefix}bias is {bias.dtype} but {prefix}weight is {weight.dtype}")


def check_labels(labels, leading_shape: torch.Size, vocab: int, ignore_index: int,
                 name: str = "labels", num_items=None) -> torch.Tensor:
    """Integer labels shaped like the hidden states without their last dimension, in ``[0, V)``.

    ``num_items``: the result of ``check_num_items``; a tensor of it off the CPU has its value
    checked in the same host sync as the labels' range (one sync for both).

    Returns:
        ``labels`` as int64.
    """
    check_tensor(name, labels, floating=False)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(f"{name} has shape {tuple(labels.shape)} but the hidden states have "
                         f"leading shape {tuple(leading_shape)}; labels are aligned with the "
                         "hidden states (no shift inside)")
    labels = labels.long()
    if os.environ.get(SKIP_LABEL_CHECK_ENV, "0") not in ("", "0"):
        return labels
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    problems = [out_of_range.any()]
    deferred_count = isinstance(num_items, torch.Tensor) and not readable_without_sync(num_items)
    if deferred_count:
        problems.append(count_is_invalid(num_items).to(labels.device))
    # A count of 0 must mean that nothing here is supervised. A Python count is known on the host:
    # no tensor to copy to the device; a tensor count is compared where it lives.
    if isinstance(num_items, torch.Tensor):
        zero_count = (num_items.reshape(()) == 0).to(labels.device)
        problems.append(zero_count & (labels != ignore_index).any())
    elif num_items == 0:
        problems.append((labels != ignore_index).any())
    if torch.compiler.is_compiling():
        # No host branch on values in a compiled graph: the same checks as one device-side assert
        # (it raises a RuntimeError when the step runs).
        torch._assert_async(~torch.stack(problems).any(), COMPILED_CHECK_MESSAGE)
        return labels
    if (labels.numel() or deferred_count) and bool(torch.stack(problems).any()):  # the one sync
        if bool(problems[0]):
            bad = labels[out_of_range][:5].tolist()
            raise ValueError(f"{name} must lie in [0, {vocab}) or equal ignore_index="
                             f"{ignore_index}; found {bad}")
        if deferred_count and bool(problems[1]):
            raise ValueError(_bad_count_message(num_items))
        raise ValueError(f"num_items_in_batch is 0 but {name} holds "
                         f"{int((labels != ignore_index).sum())} supervised tokens; it must count "
                         "the supervised tokens of the whole (accumulated) batch")
    return labels


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None outside ``torch.autocast``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def cast_for_autocast(device: torch.device, model: ModelInputs) -> ModelInputs:
    """As ``torch.nn.functional.linear`` does inside autocast, cast every floating input but
    float64 ones (autocast leaves float64 alone) to the autocast dtype (differentiably: gradients
    come back in each input's own dtype)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return model
    return model.map(lambda t: t if t.dtype == torch.float64 else t.to(dtype))


def _flat(model: ModelInputs) -> ModelInputs:
    return model._replace(hidden=model.hidden.reshape(-1, model.hidden.shape[-1]))


class PreparedPair(NamedTuple):
    """``fused_loss``'s tensors as an engine takes them.

    Attributes:
        strong, weak: flat ``ModelInputs`` (hidden ``[N, d]``), cast as under autocast; the weak
            one detached when the weak model is frozen.
        labels: ``[N]`` int64.
        shape: the shape of the user's labels (of the per-token results).
        backend: the resolved backend name.
        num_items_in_batch: as ``check_num_items`` returns it.
    """

    strong: ModelInputs
    weak: ModelInputs
    labels: torch.Tensor
    shape: torch.Size
    backend: str
    num_items_in_batch: object


def prepare_pair(strong: ModelInputs, weak: ModelInputs, labels, *, ignore_index: int,
                 reduction: str, train_weak: bool, backend: str,
                 num_items_in_batch) -> PreparedPair:
    """Check both models' tensors, the labels and the count, and prepare them for an engine.

    The scalar options are checked already (``LossOptions``); argument names in messages are
    those of ``fused_loss`` (``strong_hidden``, ``weak_bias``...).
    """
    num_items_in_batch = check_num_items(num_items_in_batch, reduction)
    check_head("strong_", *strong)
    check_head("weak_", *weak)
    if weak.vocab != strong.vocab:
        raise ValueError(f"weak_weight has vocabulary size {weak.vocab} but strong_weight has "
                         f"{strong.vocab}; both models must share one vocabulary")
    if weak.hidden.shape[:-1] != strong.hidden.shape[:-1]:
        raise ValueError(f"weak_hidden has leading shape {tuple(weak.hidden.shape[:-1])} but "
                         f"strong_hidden has {tuple(strong.hidden.shape[:-1])}")
    named = {f"{prefix}_{part}": t for prefix, model in (("strong", strong), ("weak", weak))
             for part, t in zip(ModelInputs._fields, model)}
    device = check_same_device({**named, "labels": labels})
    labels = check_labels(labels, strong.hidden.shape[:-1], strong.vocab, ignore_index,
                          num_items=num_items_in_batch)
    strong, weak = cast_for_autocast(device, strong), cast_for_autocast(device, weak)
    under_autocast = autocast_dtype(device) is not None
    check_pair_dtypes("strong_", *strong, under_autocast=under_autocast)
    check_pair_dtypes("weak_", *weak, under_autocast=under_autocast)
    if not train_weak:
        weak = weak.map(torch.Tensor.detach)
    dtypes = [(f"{prefix}_{part}", t.dtype) for prefix, model in (("strong", strong), ("weak", weak))
              for part, t in zip(ModelInputs._fields, model) if t is not None]
    backend = engines.resolve(backend, device, dtypes)
    return PreparedPair(_flat(strong), _flat(weak), labels.reshape(-1), labels.shape, backend,
                        num_items_in_batch)


class PreparedModel(NamedTuple):
    """``token_entropy``'s tensors as an engine takes them (see ``PreparedPair``); ``labels``
    is ``[N]`` int64 and ``ignore_index`` the one that applies to it (without labels every
    position is scored)."""

    model: ModelInputs
    labels: torch.Tensor
    ignore_index: int
    shape: torch.Size
    backend: str


def prepare_model(model: ModelInputs, labels, *, ignore_index: int,
                  backend: str) -> PreparedModel:
    """Check one model's tensors and optional labels, and prepare them for an engine."""
    check_head("", *model)
    device = check_same_device({**dict(zip(ModelInputs._fields, model)), "labels": labels})
    shape = model.hidden.shape[:-1]
    if labels is None:
        # Score every position: placeholder labels that are never ignored (they only feed the
        # target log-probs, which are then not needed).
        labels, ignore_index = torch.zeros(shape, device=device, dtype=torch.long), -1
    else:
        labels = check_labels(labels, shape, model.vocab, ignore_index)
    model = cast_for_autocast(device, model)
    check_pair_dtypes("", *model, under_autocast=autocast_dtype(device) is not None)
    backend = engines.resolve(backend, device, [("hidden", model.dtype)])
    return PreparedModel(_flat(model), labels.reshape(-1), ignore_index, shape, backend)
