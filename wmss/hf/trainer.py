"""``WMSSTrainer``: ``transformers.Trainer`` for a ``WMSSPair``, plus ``training_arguments``.

What it adds to Trainer:

* gradient accumulation that counts the supervised tokens itself (``get_batch_samples``): on the
  shifted labels of every micro-batch of the accumulated batch, with the pair's own
  ``ignore_index``, summed over processes under ``average_tokens_across_devices`` (Trainer then
  rescales the loss by the process count, so DDP's gradient mean is the global token mean;
  ``training_arguments`` sets it, the default only from transformers 4.54 on). With it False,
  each process divides by its own count and Trainer does not rescale: DDP's gradient mean is then
  the mean of the processes' token means (Trainer's own meaning of False). The loss scaling does
  not depend on how the installed transformers counts (versions differ: unshifted labels, a
  hard-coded -100);
* logging of the mixed loss together with the strong-only loss, the weak-only loss, both mean
  entropies, the mixed fraction (and the router loss of MoE models), from the statistics of the
  fused pass (no extra forward). Each is the mean over every supervised token of the logging
  window (all micro-batches of all processes since the last log), so it does not depend on how
  the window was split into micro-batches;
* checkpoints that hold both models, each saved by its own ``save_pretrained`` (tied embeddings
  included) under ``strong/`` and ``weak/``, and resume that restores both in place;
* checkpoints that survive a kill or a full disk: ``CompleteCheckpointMarker`` (added
  automatically; it works with a plain ``transformers.Trainer`` too) marks a checkpoint once
  Trainer has finished writing it, ``last_complete_checkpoint`` finds the newest marked one, and
  ``train(resume_from_checkpoint=True)`` resumes from it, setting half-written newer checkpoint
  folders aside (``set_aside_incomplete_checkpoints``) so that the new save does not collide.

TRL: ``WMSSSFTTrainer`` (``wmss.WMSSSFTTrainer``; needs ``trl``) is
``trl.SFTTrainer`` with the same behaviour: TRL's dataset preparation and ``SFTConfig``, the pair's
loss. Plain ``SFTTrainer`` must not be given a pair: it replaces the model's forward with its own
LM head, which would train the strong model alone (the pair refuses with an error).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
import warnings
from typing import Optional

import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..io import atomic_write_json
from .batches import Collator, pad_token_id
from .distributed import full_state_dict, is_sharded, strip_wrappers
from .lora import checkpointing_enabled, is_peft_model
from .models import unwrap
from .pair import WMSSPair

STRONG_DIR, WEAK_DIR = "strong", "weak"
MEMBER_DIRS = {"strong": STRONG_DIR, "weak": WEAK_DIR}  # a LoRA pair's weak adapter is in strong/
_LOGGED = ("strong_loss", "weak_loss", "entropy_strong", "entropy_weak", "mixed_fraction")
AUX_LOGGED = "aux_loss"

# Written into checkpoint-N by CompleteCheckpointMarker once Trainer has finished writing it.
MARKER_FILE = "wmss_checkpoint_complete.json"
# Trainer's checkpoint folders (transformers' own pattern: get_last_checkpoint's).
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Half-written checkpoints are renamed to this; it does not start with "checkpoint-", so neither
# get_last_checkpoint nor Trainer's rotation (save_total_limit globs "checkpoint-*") sees it.
INCOMPLETE_NAME = "incomplete-" + PREFIX_CHECKPOINT_DIR + "-{step}-{stamp}"
TRAINER_STATE_FILE = "trainer_state.json"
# A PEFT model's save_pretrained: per adapter, its configuration and its weights.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# accelerate's FSDP model state in a checkpoint (pytorch_model_fsdp.bin, pytorch_model_fsdp_0/).
FSDP_MODEL_NAME = "pytorch_model_fsdp"


def training_arguments(output_dir: str, *, warmup_ratio: float = 0.0,
                       activation_checkpointing: bool = False, **kwargs) -> TrainingArguments:
    """``TrainingArguments`` across transformers versions (4.46 to 5.x renamed a few fields).

    ``warmup_ratio`` becomes ``warmup_ratio`` or a fractional ``warmup_steps``;
    ``activation_checkpointing`` becomes ``activation_checkpointing`` or ``gradient_checkpointing``;
    ``fsdp=True`` (transformers 5: the options are in ``fsdp_config``) becomes transformers 4's
    ``"full_shard auto_wrap"``.
    Defaults that suit this package: no external reporting, keep extra columns, and
    ``average_tokens_across_devices=True`` on more than one process (the loss is the mean over
    the supervised tokens of all processes; transformers before 4.54 defaults to False).
    """
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("remove_unused_columns", False)
    # False by default before transformers 4.54, which also warns when it is asked for on one
    # process (and turns it off): set once the process count is known, only where it counts.
    average_tokens = ("average_tokens_across_devices" in fields
                      and "average_tokens_across_devices" not in kwargs)
    if warmup_ratio:
        kwargs["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = warmup_ratio
    if activation_checkpointing:
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kwargs[name] = True
    if kwargs.get("fsdp") is True and int(transformers.__version__.split(".")[0]) < 5:
        kwargs["fsdp"] = "full_shard auto_wrap"  # transformers 4 turns FSDP on with its options
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"unknown TrainingArguments fields for this transformers version: {unknown}")
    args = TrainingArguments(output_dir=output_dir, **kwargs)
    if average_tokens and args.world_size > 1:
        args.average_tokens_across_devices = True
    return args


def load_model_weights(model: torch.nn.Module, folder: str) -> None:
    """Load ``save_pretrained`` safetensors weights from ``folder`` into ``model`` in place.

    Parameters absent from the files must be tied to a loaded one (the same tensor, e.g. an lm
    head tied to the embeddings); a missing untied tensor, an unexpected one or a shape mismatch
    raises ``ValueError`` naming them, before anything is loaded (the model is left as it was).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index}: not a safetensors index ({error})") from None
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ValueError(f"no weights at {path}")
        try:
            state.update(load_file(path))
        except (SafetensorError, OSError) as error:  # e.g. a file cut short
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    model = unwrap(model)
    current = model.state_dict()

    def tensor_id(t: torch.Tensor) -> tuple:
        # Tied parameters are one tensor under two names: same storage, offset, shape, stride.
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())

    loaded = {tensor_id(current[k]) for k in state if k in current}
    untied = sorted(k for k in current if k not in state and tensor_id(current[k]) not in loaded)
    unexpected = sorted(k for k in state if k not in current)
    mismatched = [f"{k} {tuple(state[k].shape)} (model {tuple(current[k].shape)})"
                  for k in sorted(state) if k in current and state[k].shape != current[k].shape]
    if untied or unexpected or mismatched:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {untied}, "
                         f"unexpected {unexpected}, shape mismatch {mismatched}")
    model.load_state_dict(state, strict=False)


def load_adapter_weights(peft_model: torch.nn.Module, folder: str) -> None:
    """Load every adapter of ``peft_model`` in place from ``folder``, as the PEFT model's
    ``save_pretrained`` wrote them (the ``"default"`` adapter in ``folder``, each other in
    ``folder/NAME``). A missing adapter file, or weights the adapter does not have, raise
    ``ValueError`` naming them before anything is loaded."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    states = {}
    for adapter in peft_model.peft_config:
        where = folder if adapter == "default" else os.path.join(folder, adapter)
        path = os.path.join(where, ADAPTER_WEIGHTS)
        if not os.path.exists(path):
            raise ValueError(f"checkpoint {folder} has no weights of the adapter {adapter!r} "
                             f"(no {path})")
        states[adapter] = load_file(path)
        expected = get_peft_model_state_dict(peft_model, adapter_name=adapter)
        mismatched = sorted(set(states[adapter]) ^ set(expected))
        if mismatched:
            raise ValueError(f"checkpoint {path} does not match the adapter {adapter!r}: "
                             f"{mismatched[:8]}")
    for adapter, state in states.items():
        set_peft_model_state_dict(peft_model, state, adapter_name=adapter)


# ---- checkpoints that survive a kill or a full disk ------------------------------------------


def _checkpoint_folders(folder: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the ``checkpoint-N`` folders in ``folder``, newest first."""
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _manifest(checkpoint: str) -> dict[str, int]:
    """Size in bytes of every file under ``checkpoint`` (relative paths), the marker and hidden
    temporary files (``wmss.io``'s) excepted."""
    sizes = {}
    for root, _, names in os.walk(checkpoint):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, checkpoint)
            if relative == MARKER_FILE or name.startswith("."):
                continue
            sizes[relative.replace(os.sep, "/")] = os.path.getsize(path)
    return sizes


def is_complete_checkpoint(checkpoint: str) -> bool:
    """True if ``checkpoint`` (a ``checkpoint-N`` folder) holds a valid completion marker: written
    for step N, and every file it lists still there with the size it had when Trainer finished
    (a file truncated or removed since makes the checkpoint incomplete)."""
    match = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(checkpoint)))
    try:
        with open(os.path.join(checkpoint, MARKER_FILE), encoding="utf-8") as handle:
            marker = json.load(handle)
        if match is None or marker.get("global_step") != int(match.group(1)):
            return False
        return all(os.path.getsize(os.path.join(checkpoint, *name.split("/"))) == size
                   for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # no marker, a damaged one, or a listed file gone


def last_complete_checkpoint(folder) -> Optional[str]:
    """The newest ``checkpoint-N`` folder in ``folder`` that ``CompleteCheckpointMarker`` marked
    complete (see ``is_complete_checkpoint``), or None if there is none or ``folder`` does not
    exist (a first run). Use it where ``transformers.trainer_utils.get_last_checkpoint`` would pick
    a half-written checkpoint::

        trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))
    """
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        return None
    if not os.path.isdir(folder):
        raise ValueError(f"last_complete_checkpoint: {folder} is not a directory")
    for _, path in _checkpoint_folders(folder):
        if is_complete_checkpoint(path):
            return path
    return None


def set_aside_incomplete_checkpoints(folder, after_step: int = 0) -> list[str]:
    """Rename every ``checkpoint-N`` folder of ``folder`` with ``N > after_step`` that is not
    complete to ``incomplete-checkpoint-N-<UTC time>``, so that a resumed run's save of step N
    does not write into a half-written folder (and neither ``get_last_checkpoint`` nor Trainer's
    checkpoint rotation sees it again). Returns the new paths; warns naming them.

    Renamed, not deleted: a folder without the marker is usually what a killed save left, but it
    may also be a complete checkpoint written without the marker (by an older wmss, or a Trainer
    without ``CompleteCheckpointMarker``), and nothing a user has is deleted unasked. Delete the
    renamed folders to free their space. Safe to call from every process of a distributed run.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for step, path in _checkpoint_folders(folder):
        if step <= after_step or is_complete_checkpoint(path):
            continue
        target = os.path.join(folder, INCOMPLETE_NAME.format(step=step, stamp=stamp))
        suffix = 1
        while os.path.exists(target):  # two set-asides of one step within a second
            target = os.path.join(folder, INCOMPLETE_NAME.format(step=step, stamp=stamp)
                                  + f"-{suffix}")
            suffix += 1
        try:
            os.rename(path, target)
        except FileNotFoundError:  # another process of the run set it aside first
            continue
        moved.append(target)
    if moved:
        warnings.warn(f"checkpoints without a completion marker (half-written by an interrupted "
                      f"save) set aside: {moved}; delete them to free their space",
                      stacklevel=2)
    return moved


def _wait_for_every_process() -> None:
    """A barrier when distributed: every process has written its share of the checkpoint (the
    other ranks' RNG states, sharded states) before one of them marks it complete."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CompleteCheckpointMarker(TrainerCallback):
    """Marks a Trainer checkpoint complete once Trainer has finished writing it.

    ``on_save`` (Trainer fires it after ``checkpoint-{global_step}`` is fully written: model,
    optimizer, scheduler, RNG and trainer state, and after checkpoint rotation) writes
    ``MARKER_FILE`` into that folder atomically (``wmss.io.atomic_write_json``), listing every
    file with its size. A kill or a full disk during the save leaves the folder without the
    marker, and ``last_complete_checkpoint`` skips it. Before a save rewrites an existing
    ``checkpoint-N`` (a fresh run in a used output folder), the old marker is removed first, so a
    save interrupted halfway never looks complete.

    ``WMSSTrainer`` adds it; for a plain ``transformers.Trainer`` pass
    ``callbacks=[CompleteCheckpointMarker()]`` and resume with ``last_complete_checkpoint``.
    Checkpoints are looked for in ``args.output_dir`` (not in hyperparameter-search run folders).
    """

    @staticmethod
    def _folder(args, state) -> str:
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _unmark(self, args, state) -> None:
        marker = os.path.join(self._folder(args, state), MARKER_FILE)
        if args.should_save and os.path.exists(marker):
            os.remove(marker)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # decided by Trainer's flow callback, which runs first
            self._unmark(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._unmark(args, state)

    def on_evaluate(self, args, state, control, **kwargs):
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best":
            self._unmark(args, state)  # whether a save follows is decided after this event

    def on_save(self, args, state, control, **kwargs):
        _wait_for_every_process()
        folder = self._folder(args, state)
        if args.should_save and os.path.isdir(folder):
            atomic_write_json(os.path.join(folder, MARKER_FILE),
                              {"global_step": state.global_step, "files": _manifest(folder)},
                              indent=1)


def _resume_step(checkpoint: str) -> int:
    """The global step a checkpoint resumes at; ``ValueError`` if it is not a Trainer checkpoint."""
    if not os.path.isdir(checkpoint):
        raise ValueError(f"resume_from_checkpoint={checkpoint!r} is not a directory")
    path = os.path.join(checkpoint, TRAINER_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            return int(json.load(handle)["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"resume_from_checkpoint={checkpoint!r} is not a complete Trainer "
                         f"checkpoint: no readable {TRAINER_STATE_FILE} ({error})") from None


class WMSSTrainerMixin:
    """The ``WMSSTrainer`` behaviour, for mixing into other Trainer subclasses (e.g. TRL's)."""

    def _wmss_pair(self) -> WMSSPair:
        model = unwrap(strip_wrappers(self.model))
        if not isinstance(model, WMSSPair):
            raise TypeError(f"{type(self).__name__} trains a WMSSPair (wmss.apply_wmss), got "
                            f"{type(model).__name__}")
        return model

    def _setup_wmss(self) -> None:
        """After Trainer's ``__init__``: refuse what the pair cannot do; mark checkpoints."""
        if getattr(self.args, "label_smoothing_factor", 0):
            raise ValueError("label_smoothing_factor needs the full logits, which WMSS never "
                             "builds; set it to 0")
        if not any(isinstance(cb, CompleteCheckpointMarker)
                   for cb in self.callback_handler.callbacks):
            self.add_callback(CompleteCheckpointMarker())  # last: after the user's callbacks
        if self.args.label_names is None:
            # Trainer takes every forward argument named "*label*" as a label it requires, and
            # evaluates without a loss unless all are given: the pair's optional shift_labels
            # would leave evaluation without eval_loss.
            self.label_names = ["labels"]
        self._wmss_window, self._wmss_aux_seen = None, False

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the newest *complete*
        checkpoint of ``args.output_dir`` (``last_complete_checkpoint``), not from a newer one a
        killed save left half-written (``ValueError`` if there is none: pass
        ``last_complete_checkpoint(output_dir)`` to resume when possible and start afresh
        otherwise). Whatever the start, half-written checkpoint folders past it are set aside
        (``set_aside_incomplete_checkpoints``) so that this run's saves do not write into them."""
        output_dir = self.args.output_dir
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is True:
            found = last_complete_checkpoint(output_dir)
            if found is None:
                present = ([os.path.basename(p) for _, p in _checkpoint_folders(output_dir)]
                           if os.path.isdir(output_dir) else [])
                raise ValueError(
                    f"resume_from_checkpoint=True: no complete checkpoint in {output_dir} (found "
                    f"{present or 'none'}; a checkpoint is complete once {MARKER_FILE} marks it). "
                    "Pass a checkpoint's path to resume from it anyway, or None to start afresh")
            resume_from_checkpoint = found
        start = 0
        if resume_from_checkpoint is not None:
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            start = _resume_step(resume_from_checkpoint)
        if self.args.should_save:
            set_aside_incomplete_checkpoints(output_dir, after_step=start)
        self._wmss_window, self._wmss_aux_seen = None, False
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        """The next ``num_batches`` micro-batches of one optimizer step and their supervised-token
        count (``num_items_in_batch``), counted here rather than by Trainer (see the module doc).

        The signature covers transformers 4.46/4.47 (``epoch_iterator, num_batches``) and 4.48+
        (``..., device``)."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        return batch_samples, self._count_supervised(
            batch_samples, self.args.device if device is None else device)

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """Trainer's own count (transformers 5.x, also used for the evaluation loss): ours."""
        return self._count_supervised(batch_samples, device)

    def _count_supervised(self, batch_samples: list, device):
        """Supervised next-token targets of ``batch_samples`` (int64 tensor on ``device``): the
        shifted labels (``shift_labels`` where the collator gives them) that are not the pair's
        ``ignore_index``; over all processes when ``average_tokens_across_devices``, as Trainer
        expects when it rescales the loss by the process count. None without labels."""
        ignore_index = self._wmss_pair().ignore_index
        total = None
        for batch in batch_samples:
            if "shift_labels" in batch:
                targets = batch["shift_labels"]
            elif "labels" in batch:
                targets = batch["labels"]
                targets = targets[..., 1:] if isinstance(targets, torch.Tensor) else None
            else:
                targets = None
            if not isinstance(targets, torch.Tensor):
                return None
            count = (targets != ignore_index).sum().to(device)
            total = count if total is None else total + count
        if total is None:
            return None
        args = self.args
        if getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        elif args.n_gpu > 1:  # DataParallel without token averaging: Trainer's approximation
            total = total // args.n_gpu
        if args.n_gpu > 1 and total.dim() == 0:  # DataParallel scatters one count per replica
            total = total.unsqueeze(0).expand(args.n_gpu, -1)
        # Ranks that share one batch (tensor/context/sequence parallel) count it once, as in
        # Trainer's own count (transformers >= 4.5x; absent before: a size of 1).
        shared = 1
        for size in ("get_tp_size", "get_cp_size", "get_sp_size"):
            shared *= getattr(self, size, lambda: 1)()
        return total if shared == 1 else total / shared

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer's own compute_loss (not a subclass's, e.g. TRL's, which expects its own outputs):
        # the pair returns the loss, and Trainer rescales it for token averaging across devices.
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training and outputs.get("strong_loss") is not None:
            self._accumulate_logged(outputs)
        return (loss, outputs) if return_outputs else loss

    def _accumulate_logged(self, outputs) -> None:
        """Add one micro-batch's statistics to the logging window, weighted by its supervised
        tokens (so the logged value is the window's per-token mean). Accumulated on the device;
        read back only when Trainer logs (no per-step host sync)."""
        tokens = outputs["num_tokens"].detach().float().reshape(-1)  # one value per DP replica
        aux = outputs.get("aux_loss")
        self._wmss_aux_seen = self._wmss_aux_seen or aux is not None
        values = [outputs[name].detach().float().reshape(-1) for name in _LOGGED]
        values.append(torch.zeros_like(tokens) if aux is None
                      else aux.detach().float().reshape(-1).expand_as(tokens))
        window = torch.cat([(torch.stack(values) * tokens).sum(-1), tokens.sum()[None]])
        self._wmss_window = window if self._wmss_window is None else self._wmss_window + window

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # Trainer's training log, on every process at the same step
            window = self._wmss_window
            if self.args.world_size > 1:  # the window of every process: the whole batch's mean
                if window is None:
                    window = torch.zeros(len(_LOGGED) + 2, device=self.args.device)
                window = self.accelerator.reduce(window, reduction="sum")
            if window is not None and float(window[-1]) > 0:
                *sums, tokens = window.tolist()
                names = _LOGGED + ((AUX_LOGGED,) if self._wmss_aux_seen else ())
                logs.update({name: round(value / tokens, 6) for name, value in zip(names, sums)})
            self._wmss_window = None
        super().log(logs, *args, **kwargs)

    # ---- checkpoints: both models, however the pair is sharded --------------------------------

    def _wmss_weights_sharded(self) -> bool:
        """Whether the pair's live parameters are shards (FSDP2, ZeRO-3), so that a member's own
        ``save_pretrained`` would write shards; the same answer on every process."""
        return is_sharded(self.model)

    def _wmss_trainer_gathers(self) -> bool:
        """Whether Trainer's ``save_model`` hands ``_save`` the full state dict: FSDP with
        ``FULL_STATE_DICT``, DeepSpeed below ZeRO-3 or ZeRO-3 with
        ``stage3_gather_16bit_weights_on_model_save``. In the sharded modes (FSDP's
        ``SHARDED_STATE_DICT``, ZeRO-3 without the 16-bit gather) it hands nothing: the weights
        are only in its sharded checkpoint."""
        if getattr(self, "is_fsdp_enabled", False):
            return "FULL_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type)
        if getattr(self, "is_deepspeed_enabled", False):
            engine = self.model_wrapped
            if not hasattr(engine, "zero_gather_16bit_weights_on_model_save"):
                return True  # not prepared yet: the parameters are not partitioned either
            return (engine.zero_optimization_stage() < 3
                    or bool(engine.zero_gather_16bit_weights_on_model_save()))
        return True

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``: ``strong/`` and ``weak/`` (``MEMBER_DIRS``) in ``output_dir``,
        each loadable by ``AutoModelForCausalLM.from_pretrained``, in every mode. Called by a
        user in a sharded mode (FSDP ``SHARDED_STATE_DICT``, ZeRO-3 without
        ``stage3_gather_16bit_weights_on_model_save``, where Trainer itself would save no
        loadable weights), the full weights are gathered for it (``wmss.hf.distributed``);
        Trainer's own checkpoints in those modes keep only its sharded state (no gathering at
        every save). Collective, as Trainer's: every process calls it."""
        self._wmss_explicit_save = not _internal_call
        try:
            if (not _internal_call and getattr(self, "is_fsdp_enabled", False)
                    and not self._wmss_trainer_gathers()):
                # Trainer's save_model writes nothing in FSDP's sharded mode: gather here.
                self._save(output_dir)
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            self._wmss_explicit_save = False

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """Both models under ``strong/`` and ``weak/``, by the main process.

        ``state_dict`` is what Trainer gathered (the pair's full state dict on the main process,
        ``{}`` or None on the others): it is split by member (the pair's state-dict prefixes) and
        each part saved with the member's ``save_pretrained(state_dict=...)``. Without one, an
        unsharded pair saves each member's live weights; a sharded one gathers them
        (``full_state_dict``, collective) for a user's ``save_model``, and saves no weights in
        Trainer's own sharded checkpoints (Trainer/accelerate write the sharded state there)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        pair = self._wmss_pair()
        states = None
        if self._wmss_weights_sharded():
            if self._wmss_trainer_gathers():  # the same branch on every process
                if self.args.should_save:
                    if not state_dict:
                        raise ValueError("_save: the pair is sharded and Trainer gathers its "
                                         "weights, but no state_dict was given to save")
                    states = self._wmss_split(pair, state_dict)
            elif getattr(self, "_wmss_explicit_save", False):
                full = full_state_dict(self.model)  # collective: every process gathers
                states = self._wmss_split(pair, full) if self.args.should_save else None
            else:
                states = {}  # a sharded checkpoint: its weights are Trainer's sharded files
        elif state_dict:  # e.g. ZeRO-1/2: Trainer's copy of the (unsharded) weights
            states = self._wmss_split(pair, state_dict) if self.args.should_save else None
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        for name, member in pair.models_with_weights().items():
            if states is not None and name not in states:
                continue
            folder = os.path.join(output_dir, MEMBER_DIRS[name])
            if states is None and is_peft_model(member):  # a LoRA pair: its adapters alone
                member.save_pretrained(folder)
            elif states is None:
                unwrap(member).save_pretrained(folder)
            else:
                unwrap(member).save_pretrained(folder, state_dict=states[name])
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    @staticmethod
    def _wmss_split(pair: WMSSPair, state_dict: dict) -> dict[str, dict]:
        """The pair's full state dict as one state dict per member (``models_with_weights``),
        keyed as the member's transformers model (``unwrap(member).state_dict()``); names the
        model ties to one tensor get one tensor (``save_pretrained`` then saves it once).
        ``ValueError`` naming the keys if a member's weights are not all there."""
        paths = {id(module): name for name, module in pair.named_modules()}
        split = {}
        for name, member in pair.models_with_weights().items():
            model = unwrap(member)
            prefix = paths[id(model)] + "."
            part = {key[len(prefix):]: value for key, value in state_dict.items()
                    if key.startswith(prefix)}
            live = model.state_dict(keep_vars=True)
            first: dict[int, str] = {}
            for key, tensor in live.items():  # tied names: one saved tensor
                owner = first.setdefault(id(tensor), key)
                if owner != key and owner in part:
                    part[key] = part[owner]
            missing = sorted(set(live) - set(part))
            if missing:
                raise ValueError(f"the state dict to save lacks {len(missing)} weights of the "
                                 f"{name} model (under {prefix!r}): {missing[:5]}")
            split[name] = part
        return split

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore both models from a checkpoint. Under FSDP the checkpoint's FSDP model state
        (``pytorch_model_fsdp*``: full or sharded, as accelerate wrote it) is loaded by Trainer's
        own code into the sharded model; under DeepSpeed, DeepSpeed's checkpoint (Trainer loads it
        itself with ``deepspeed_load_checkpoint`` when it resumes and never calls this; this is
        for other callers); otherwise ``strong/`` and ``weak/`` into the live models."""
        if getattr(self, "is_deepspeed_enabled", False):
            from transformers.integrations.deepspeed import deepspeed_load_checkpoint

            deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint,
                                      load_module_strict=True)
            return
        if getattr(self, "is_fsdp_enabled", False):
            if not _has_fsdp_model_state(resume_from_checkpoint):
                raise ValueError(
                    f"{resume_from_checkpoint} holds no FSDP model state ({FSDP_MODEL_NAME}*); "
                    "a checkpoint saved with save_only_model=True cannot resume under FSDP")
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        pair = unwrap(model) if model is not None else self._wmss_pair()
        for name, member in pair.models_with_weights().items():
            sub = MEMBER_DIRS[name]
            folder = os.path.join(resume_from_checkpoint, sub)
            if not os.path.isdir(folder):
                raise ValueError(f"{resume_from_checkpoint} is not a WMSSTrainer checkpoint "
                                 f"(no {sub}/ folder)")
            if is_peft_model(member) and os.path.exists(os.path.join(folder, ADAPTER_CONFIG)):
                load_adapter_weights(member, folder)
            else:  # a whole model (a LoRA pair's checkpoint before wmss saved adapters alone)
                load_model_weights(member, folder)

    def _load_best_model(self) -> None:
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            super()._load_best_model()  # DeepSpeed's / FSDP's checkpoint, by Trainer's own code
            return
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def _has_fsdp_model_state(checkpoint: str) -> bool:
    """Whether ``checkpoint`` holds accelerate's FSDP model state (Trainer's own test: a
    ``pytorch_model_fsdp*`` folder for a sharded state dict, ``pytorch_model_fsdp.bin`` for a
    full one)."""
    if not os.path.isdir(checkpoint):
        return False
    return any(name.startswith(FSDP_MODEL_NAME) for name in os.listdir(checkpoint))


def _default_find_unused_parameters(model: WMSSPair, args: Optional[TrainingArguments]) -> None:
    """Set ``args.ddp_find_unused_parameters`` by Trainer's rule for a ``PreTrainedModel`` when
    the user left it None: False when activation checkpointing is on (asked in ``args``, or
    already enabled in a member), else True. Trainer's rule for any other model (the pair) is
    True, and DDP's search for unused parameters breaks under reentrant activation
    checkpointing (transformers 4's default): a parameter is marked ready twice. Set on ``args``
    because that is where Trainer reads it (transformers 5 in ``__init__``, 4 in ``train``)."""
    if args is None or getattr(args, "ddp_find_unused_parameters", False) is not None:
        return
    fields = {f.name for f in dataclasses.fields(args)}  # renamed in 5.x; the old name warns
    asked = bool(getattr(args, "activation_checkpointing" if "activation_checkpointing" in fields
                         else "gradient_checkpointing", False))
    enabled = any(checkpointing_enabled(unwrap(member)) for member in (model.strong, model.weak))
    args.ddp_find_unused_parameters = not (asked or enabled)


class WMSSTrainer(WMSSTrainerMixin, Trainer):
    """``transformers.Trainer`` for a ``WMSSPair`` (see the module doc).

    ``data_collator`` defaults to ``wmss.hf.batches.Collator`` with the tokenizer's pad id when a
    ``processing_class`` (tokenizer) is given; the datasets hold ``input_ids`` and ``labels``
    (``wmss.recipe.data.encode_records``).
    """

    def __init__(self, model: WMSSPair, args: TrainingArguments, *trainer_args, **kwargs):
        if not isinstance(unwrap(model), WMSSPair):
            raise TypeError(f"WMSSTrainer trains a WMSSPair (wmss.apply_wmss), got "
                            f"{type(model).__name__}")
        _default_find_unused_parameters(unwrap(model), args)
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and tokenizer is not None:
            kwargs["data_collator"] = Collator(pad_token_id(tokenizer))
        super().__init__(model, args, *trainer_args, **kwargs)
        self._setup_wmss()


@functools.lru_cache(maxsize=None)  # one class: isinstance and subclassing must agree
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
            if kwargs.get("peft_config") is not None:
                # TRL would wrap the whole pair: both models would get adapters of one config.
                raise ValueError(
                    "peft_config: WMSSSFTTrainer does not wrap the pair with PEFT (it would put "
                    "adapters on both models); wrap the strong model with peft.get_peft_model "
                    "first and build the pair from it: wmss.apply_wmss(peft_model, 'base') or "
                    "wmss.apply_wmss(peft_model, 'adapter:NAME') for a LoRA pair on one base "
                    "model, or apply_wmss(peft_model, weak_model) for two models")
            _default_find_unused_parameters(unwrap(model), kwargs.get(
                "args", trainer_args[0] if trainer_args else None))
            super().__init__(model, *trainer_args, **kwargs)
            vars(unwrap(self.model)).pop("forward", None)  # undo TRL's instance-level patch
            self._setup_wmss()

    return WMSSSFTTrainer


def __getattr__(name):
    if name == "WMSSSFTTrainer":  # built on first use: TRL is optional
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
