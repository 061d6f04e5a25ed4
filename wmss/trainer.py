"""``WMSSTrainer``: ``transformers.Trainer`` for a ``WMSSPair``, plus ``training_arguments``.

What it adds to Trainer:

* gradient accumulation that counts supervised tokens on the shifted labels (the pair declares
  ``loss_type = "ForCausalLM"`` and ``accepts_loss_kwargs``, so Trainer passes
  ``num_items_in_batch`` and, with ``average_tokens_across_devices``, sums it over processes and
  rescales the loss by the process count, so DDP's gradient mean gives the global token mean);
* logging of the mixed loss together with the strong-only loss, the weak-only loss, both mean
  entropies and the mixed fraction, from the statistics of the fused pass (no extra forward);
* checkpoints that hold both models, each saved by its own ``save_pretrained`` (tied embeddings
  included) under ``strong/`` and ``weak/``, and resume that restores both in place.

TRL: ``WMSSSFTTrainer`` (``from wmss.trainer import WMSSSFTTrainer``; needs ``trl``) is
``trl.SFTTrainer`` with the same behaviour: TRL's dataset preparation and ``SFTConfig``, the pair's
loss. Plain ``SFTTrainer`` must not be given a pair: it replaces the model's forward with its own
LM head, which would train the strong model alone (the pair refuses with an error).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch
from transformers import Trainer, TrainingArguments

from .data import Collator, pad_token_id
from .hf import unwrap
from .pair import WMSSPair

STRONG_DIR, WEAK_DIR = "strong", "weak"
_LOGGED = ("strong_loss", "weak_loss", "entropy_strong", "entropy_weak", "mixed_fraction")


def training_arguments(output_dir: str, *, warmup_ratio: float = 0.0,
                       activation_checkpointing: bool = False, **kwargs) -> TrainingArguments:
    """``TrainingArguments`` across transformers versions (4.46 to 5.x renamed a few fields).

    ``warmup_ratio`` becomes ``warmup_ratio`` or a fractional ``warmup_steps``;
    ``activation_checkpointing`` becomes ``activation_checkpointing`` or ``gradient_checkpointing``.
    Defaults that suit this package: no external reporting, keep extra columns.
    """
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("remove_unused_columns", False)
    if warmup_ratio:
        kwargs["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = warmup_ratio
    if activation_checkpointing:
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kwargs[name] = True
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"unknown TrainingArguments fields for this transformers version: {unknown}")
    return TrainingArguments(output_dir=output_dir, **kwargs)


def load_model_weights(model: torch.nn.Module, folder: str) -> None:
    """Load ``save_pretrained`` safetensors weights from ``folder`` into ``model`` in place.

    Parameters absent from the files must be tied to a loaded one (e.g. an lm head tied to the
    embeddings); anything else missing or unexpected raises.
    """
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ValueError(f"no weights at {path}")
        state.update(load_file(path))
    model = unwrap(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    current = model.state_dict()
    untied = [k for k in missing if current[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {untied}, "
                         f"unexpected {list(unexpected)}")


class WMSSTrainerMixin:
    """The ``WMSSTrainer`` behaviour, for mixing into other Trainer subclasses (e.g. TRL's)."""

    def _wmss_pair(self) -> WMSSPair:
        model = unwrap(self.model)
        if not isinstance(model, WMSSPair):
            raise TypeError(f"{type(self).__name__} trains a WMSSPair (wmss.apply_wmss), got "
                            f"{type(model).__name__}")
        return model

    def _check_wmss_args(self) -> None:
        if getattr(self.args, "label_smoothing_factor", 0):
            raise ValueError("label_smoothing_factor needs the full logits, which WMSS never "
                             "builds; set it to 0")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer's own compute_loss (not a subclass's, e.g. TRL's, which expects its own outputs):
        # the pair returns the loss, and Trainer rescales it for token averaging across devices.
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training and outputs.get("strong_loss") is not None:
            # Accumulate on the device; read back only when Trainer logs (no per-step host sync).
            sums = getattr(self, "_wmss_sums", None)
            values = torch.stack([outputs[name].detach().float() for name in _LOGGED])
            self._wmss_sums = values if sums is None else sums + values
            self._wmss_steps = getattr(self, "_wmss_steps", 0) + 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        sums = getattr(self, "_wmss_sums", None)
        if sums is not None and "loss" in logs:
            means = (sums / self._wmss_steps).tolist()
            logs.update({name: round(value, 6) for name, value in zip(_LOGGED, means)})
            self._wmss_sums, self._wmss_steps = None, 0
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """Both models, each with its own ``save_pretrained`` (Trainer's default of one state dict
        fails on the shared tensors of tied embeddings)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        pair = self._wmss_pair()
        os.makedirs(output_dir, exist_ok=True)
        unwrap(pair.strong).save_pretrained(os.path.join(output_dir, STRONG_DIR))
        unwrap(pair.weak).save_pretrained(os.path.join(output_dir, WEAK_DIR))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        pair = unwrap(model) if model is not None else self._wmss_pair()
        for sub, member in ((STRONG_DIR, pair.strong), (WEAK_DIR, pair.weak)):
            folder = os.path.join(resume_from_checkpoint, sub)
            if not os.path.isdir(folder):
                raise ValueError(f"{resume_from_checkpoint} is not a WMSSTrainer checkpoint "
                                 f"(no {sub}/ folder)")
            load_model_weights(member, folder)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class WMSSTrainer(WMSSTrainerMixin, Trainer):
    """``transformers.Trainer`` for a ``WMSSPair`` (see the module doc).

    ``data_collator`` defaults to ``wmss.data.Collator`` with the tokenizer's pad id when a
    ``processing_class`` (tokenizer) is given; the datasets hold ``input_ids`` and ``labels``
    (``wmss.data.encode_records``).
    """

    def __init__(self, model: WMSSPair, args: TrainingArguments, *trainer_args, **kwargs):
        if not isinstance(unwrap(model), WMSSPair):
            raise TypeError(f"WMSSTrainer trains a WMSSPair (wmss.apply_wmss), got "
                            f"{type(model).__name__}")
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and tokenizer is not None:
            kwargs["data_collator"] = Collator(pad_token_id(tokenizer))
        super().__init__(model, args, *trainer_args, **kwargs)
        self._check_wmss_args()


def _sft_trainer_class():
    """``WMSSSFTTrainer``: TRL's ``SFTTrainer`` (its data preparation, collator and config) training
    a ``WMSSPair`` with the fused WMSS loss."""
    try:
        from trl import SFTTrainer
    except ImportError as error:
        raise ImportError("WMSSSFTTrainer needs TRL (pip install trl)") from error

    class WMSSSFTTrainer(WMSSTrainerMixin, SFTTrainer):
        """``trl.SFTTrainer`` for a ``WMSSPair``: TRL prepares the data; the pair computes the loss.

        TRL installs its own fused LM head by replacing ``model.forward``; on a pair that would
        train the strong model alone, so the pair's forward is restored after TRL's set-up.
        """

        def __init__(self, model: WMSSPair, *trainer_args, **kwargs):
            if not isinstance(unwrap(model), WMSSPair):
                raise TypeError(f"WMSSSFTTrainer trains a WMSSPair (wmss.apply_wmss), got "
                                f"{type(model).__name__}")
            super().__init__(model, *trainer_args, **kwargs)
            vars(unwrap(self.model)).pop("forward", None)  # undo TRL's instance-level patch
            self._check_wmss_args()

    return WMSSSFTTrainer


def __getattr__(name):
    if name == "WMSSSFTTrainer":  # built on first use: TRL is optional
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
