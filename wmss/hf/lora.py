"""A LoRA pair on one base model: the weak model as a view of the strong PEFT model.

The weak model of WMSS is usually the base the strong one was tuned from, so with LoRA both live
in one set of base weights. ``apply_wmss(peft_model, weak)`` takes ``weak`` as a string:

* ``"base"``: the weak model is the PEFT model's base with its adapters disabled: frozen, the
  paper's frozen-weak variant (``train_weak=False``);
* ``"adapter:NAME"``: the weak model is the same base with the adapter ``NAME`` of the same PEFT
  model active instead of the strong one's (trained unless ``train_weak=False``; a
  zero-initialised adapter is exactly the base, M0).

``AdapterView`` is that weak model: an ``nn.Module`` that holds the PEFT model without registering
it (the pair's parameters stay one base plus the adapters, each once) and switches the adapters
around the weak forward (``active()``). The switch happens between the two forwards, so a layer
recomputed in the backward (activation checkpointing) would recompute with the adapter active at
that moment: ``"adapter:NAME"`` refuses activation checkpointing; ``"base"`` runs the weak model
without autograd, so nothing of it is recomputed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from typing import Iterator, Optional

import torch
from torch import nn

BASE = "base"
ADAPTER_PREFIX = "adapter:"
WEAK_CHOICES = f"{BASE!r} or '{ADAPTER_PREFIX}NAME'"


def is_peft_model(model) -> bool:
    """Whether ``model`` is a PEFT ``PeftModel`` (without importing peft when it is not)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class AdapterView(nn.Module):
    """The weak model of a LoRA pair: ``peft_model`` with its adapters disabled (``adapter=None``)
    or with the adapter ``adapter`` active. Attributes the view lacks are the PEFT model's."""

    def __init__(self, peft_model: nn.Module, adapter: Optional[str], strong_adapter: str):
        super().__init__()
        # Not a submodule: the pair registers the PEFT model once, as the strong model.
        object.__setattr__(self, "peft_model", peft_model)
        self.adapter, self.strong_adapter = adapter, strong_adapter

    @property
    def description(self) -> str:
        return BASE if self.adapter is None else f"{ADAPTER_PREFIX}{self.adapter}"

    def get_base_model(self) -> nn.Module:
        """The transformers model inside (what ``wmss.hf.models.unwrap`` looks for)."""
        return self.peft_model.get_base_model()

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The weak adapter's parameters (none for ``"base"``)."""
        if self.adapter is None:
            return []
        marker = f".{self.adapter}."
        return [p for name, p in self.peft_model.named_parameters() if marker in f"{name}."]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the PEFT model as the weak model inside; every ``requires_grad`` flag is as before
        on exit (PEFT's switches set them; the pair decides what is trained)."""
        flags = [(p, p.requires_grad) for p in self.peft_model.parameters()]
        try:
            if self.adapter is None:
                with self.peft_model.disable_adapter():
                    yield
            else:
                self.peft_model.set_adapter(self.adapter)
                _restore(flags)
                yield
        finally:
            if self.adapter is not None:
                self.peft_model.set_adapter(self.strong_adapter)
            _restore(flags)

    def forward(self, *args, **kwargs):
        with self.active():
            return self.peft_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "peft_model"), name)


def _restore(flags) -> None:
    for parameter, requires_grad in flags:
        if parameter.requires_grad != requires_grad:
            parameter.requires_grad_(requires_grad)


def adapter_view(peft_model: nn.Module, weak: str, train_weak: Optional[bool]) -> tuple[
        AdapterView, bool]:
    """The weak view that ``weak`` names, and the ``train_weak`` it implies.

    Raises:
        ValueError: naming ``weak_model`` or ``train_weak``: ``peft_model`` is not a PEFT model, an
            unknown form or adapter, the strong adapter itself, a prompt-learning adapter, or
            ``"base"`` asked to train.
    """
    if not is_peft_model(peft_model):
        raise ValueError(f"weak_model={weak!r} names a part of a PEFT model, but strong_model is "
                         f"a {type(peft_model).__name__}; wrap it with peft.get_peft_model, or "
                         "pass the weak model itself")
    strong_adapter = peft_model.active_adapter
    configs = peft_model.peft_config
    if configs[strong_adapter].is_prompt_learning:
        raise ValueError(f"the strong model's adapter {strong_adapter!r} is a prompt-learning "
                         "adapter; a LoRA pair needs adapters on the model's layers (LoRA, "
                         "LoHa, IA3...)")
    if weak == BASE:
        if train_weak:
            raise ValueError("train_weak=True cannot train weak_model='base': the base weights "
                             "are the strong model's too; use weak_model='adapter:NAME' for a "
                             "trained weak model")
        return AdapterView(peft_model, None, strong_adapter), False
    if not weak.startswith(ADAPTER_PREFIX) or not weak[len(ADAPTER_PREFIX):]:
        raise ValueError(f"weak_model={weak!r}: a string names the weak model inside the strong "
                         f"PEFT model, {WEAK_CHOICES}")
    name = weak[len(ADAPTER_PREFIX):]
    if name not in configs:
        raise ValueError(f"weak_model={weak!r}: the PEFT model has no adapter {name!r} (it has "
                         f"{sorted(configs)}; add one with peft_model.add_adapter)")
    if name == strong_adapter:
        raise ValueError(f"weak_model={weak!r} is the strong model's own active adapter; the "
                         "weak model needs another adapter")
    if configs[name].is_prompt_learning:
        raise ValueError(f"weak_model={weak!r} is a prompt-learning adapter; the weak adapter "
                         "must act on the model's layers (LoRA, LoHa, IA3...)")
    view = AdapterView(peft_model, name, strong_adapter)
    train_weak = True if train_weak is None else train_weak
    for parameter in view.adapter_parameters():
        parameter.requires_grad_(train_weak)
    return view, train_weak


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on in a transformers model."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        value = getattr(type(model), name, None)
        if value is not None:
            return bool(getattr(model, name))
    return False


def merged_copy(peft_model: nn.Module) -> nn.Module:
    """A transformers model with the active adapter merged into a copy of the base weights (the
    PEFT model itself is left as it was)."""
    model = copy.deepcopy(peft_model)
    return model.merge_and_unload(adapter_names=[peft_model.active_adapter])


@torch.no_grad()
def save_strong(peft_model: nn.Module, save_directory, *, merged: bool, **kwargs) -> None:
    """Save the strong model of a PEFT model: its active adapter as a PEFT adapter folder
    (``adapter_config.json`` and the adapter's weights, loadable with
    ``PeftModel.from_pretrained`` or ``AutoModelForCausalLM.from_pretrained``), or with
    ``merged`` a full transformers model with the adapter merged in."""
    if merged:
        merged_copy(peft_model).save_pretrained(save_directory, **kwargs)
        return
    adapter = peft_model.active_adapter
    if adapter == "default":
        peft_model.save_pretrained(save_directory, selected_adapters=[adapter], **kwargs)
        return
    # PEFT writes an adapter other than "default" to a subfolder named after it; the strong
    # model's folder is save_directory itself.
    os.makedirs(save_directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=save_directory) as scratch:
        peft_model.save_pretrained(scratch, selected_adapters=[adapter], **kwargs)
        source = os.path.join(scratch, adapter)
        for entry in os.listdir(source):
            os.replace(os.path.join(source, entry), os.path.join(save_directory, entry))
