"""The scoring loop: ``score_dataset``, both models' per-example mean next-token entropies.

Batches of the data set run through each model's backbone; ``wmss.token_entropy`` folds the
final hidden states with the lm head (no ``[tokens, vocab]`` logits). Progress is checkpointed
through ``signatures._Checkpoint``.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import nn

from ...defaults import IGNORE_INDEX
from ...hf import batches
from ...hf import models as hf
from ...loss import token_entropy
from ...loss.engines import BACKENDS
from ...validation import check_choice, check_flag, check_ignore_index, check_int
from .catalog import _Catalog, _catalog
from .scores_file import DatasetScores
from .signatures import _Checkpoint, _model_signature

__all__ = ["SAVE_INTERVAL", "score_dataset"]

# Seconds between checkpoints of score_dataset's output file. Each checkpoint rewrites the whole
# file (O(examples)), so a time interval keeps the total cost bounded on large data sets.
SAVE_INTERVAL = 60.0


@contextlib.contextmanager
def _evaluating(*models: nn.Module):
    """Eval mode (no dropout) and no autograd; the previous training modes are restored."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError(f"{type(model).__name__} has no parameters") from None


def _check_vocabulary(name: str, model: nn.Module, head: hf.LMHead, catalog: _Catalog) -> None:
    """Token ids must exist in the model: a clear error instead of an index error on device."""
    embeddings = hf.unwrap(model).get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and catalog.max_input_id >= rows:
        raise ValueError(f"{name} has {rows} input embeddings but the data set holds token id "
                         f"{catalog.max_input_id}; was it tokenised for another model?")
    if catalog.max_label >= head.vocab_size:
        raise ValueError(f"{name}'s lm head has {head.vocab_size} outputs but the data set "
                         f"holds label {catalog.max_label}")


def _batch_tensors(dataset, indices: list[int], pad_token_id: int, ignore_index: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` ``[B, T]``; shifted ``targets`` ``[B, T]``.

    ``targets[:, t]`` is the label of position ``t + 1``, predicted by the hidden state at ``t``
    (the HF shift, ``wmss.hf.batches.shift_labels``); padding, unsupervised positions and the last
    position hold ``ignore_index``.
    """
    batch = batches.collate([dataset[i] for i in indices], pad_token_id)
    labels = torch.where(batch["attention_mask"].bool(), batch["labels"],
                         torch.full_like(batch["labels"], ignore_index))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "targets": batches.shift_labels(labels, ignore_index)}


def _entropy_sums(model: nn.Module, head: hf.LMHead, batch: dict, backend: str,
                  ignore_index: int) -> torch.Tensor:
    """Per row, the sum of the model's next-token entropies over its supervised targets.

    Returns float64 CPU ``[B]``. Only the final hidden states are computed; ``token_entropy``
    folds the vocabulary in blocks, so no ``[B, T, V]`` logits exist at any point.
    """
    device = _device(model)
    hidden = hf.final_hidden_states(model, batch["input_ids"].to(device),
                                    batch["attention_mask"].to(device))
    # The model's own head would need matching dtypes too; some backbones return float32 norms.
    # With a model split across devices (device_map), the head may sit elsewhere than the input.
    head_device = head.weight.device
    hidden, weight, bias = head.model_inputs(hidden.to(head_device, head.weight.dtype))
    entropy = token_entropy(hidden, weight, batch["targets"].to(head_device), bias=bias,
                            softcap=head.softcap, ignore_index=ignore_index, backend=backend)
    # Entropies are >= 0; float32 rounding can leave ~-1e-7 on a near one-hot distribution.
    return entropy.double().clamp_min(0).sum(1).cpu()


def score_dataset(strong_model: nn.Module, weak_model: nn.Module, dataset: Sequence[Mapping], *,
                  batch_size: int = 8, pad_token_id: int = 0,
                  output: Optional[str | os.PathLike] = None, backend: str = "auto",
                  progress: bool = True, ignore_index: int = IGNORE_INDEX,
                  overwrite: bool = False, save_interval: float = SAVE_INTERVAL) -> DatasetScores:
    """Per-example mean next-token entropy of both models over the supervised targets.

    Args:
        strong_model, weak_model: Hugging Face causal LMs sharing the data set's tokenizer (each
            on its own device; see ``wmss.hf.models.LMHead`` for the supported heads). They run in eval
            mode without gradients; their training modes are restored afterwards.
        dataset: a sequence of ``{"input_ids": [...], "labels": [...]}`` (lists of ints, labels
            aligned with input_ids and ``ignore_index`` on unsupervised tokens), exactly what
            ``wmss.recipe.data.encode_records`` returns. Other keys are ignored.
        batch_size: examples per forward pass. Examples are batched in order of decreasing
            length (little padding; an out-of-memory error shows up in the first batch); results
            come back in data-set order.
        pad_token_id: id used to right-pad batches (masked by the attention mask, never scored).
        output: optional scores file (format: ``DatasetScores.save``). Progress is checkpointed
            there atomically every ``save_interval`` seconds, when scoring stops on an exception
            (e.g. KeyboardInterrupt), and at the end. If the file exists and belongs to this data
            set (same size, token ids and labels) and these models (same class, size, dtype and
            SHA-256 of every parameter and buffer), its scores are kept and only the missing
            examples are computed. A file of format version 1 (an older wmss) is never reused:
            it is refused, or replaced with ``overwrite``. Hashing reads every weight of both
            models once per call.
        backend: ``token_entropy`` backend ("auto", "triton", "torch", "reference").
        progress: show a tqdm progress bar (on stderr).
        ignore_index: the label of unsupervised tokens.
        overwrite: if ``output`` exists but holds something else (other data, other models, an
            older format, not a scores file), replace it instead of raising ``ValueError``.
        save_interval: seconds between checkpoints (0: after every batch).

    Returns:
        ``DatasetScores``: float64 ``entropy_strong``/``entropy_weak`` and int64 ``tokens``,
        ``[len(dataset)]`` each. Per example, the entropies are averaged (in float64) over its
        supervised targets after the HF shift (the hidden state at ``t`` predicts ``labels[t+1]``);
        an example with none gets ``tokens = 0`` and entropies 0 (and no model is run on it).

    Raises:
        ValueError: malformed data set, token ids outside a model's vocabulary, an ``output``
            that holds something else (without ``overwrite``), or a model that produces
            non-finite entropies (e.g. float16 overflow).
    """
    batch_size = check_int("batch_size", batch_size, 1)
    pad_token_id = check_int("pad_token_id", pad_token_id, 0)
    ignore_index = check_ignore_index(ignore_index)
    check_choice("backend", backend, BACKENDS)
    check_flag("progress", progress)
    check_flag("overwrite", overwrite)
    if isinstance(save_interval, bool) or not isinstance(save_interval, numbers.Real) or \
            not save_interval >= 0:
        raise ValueError(f"save_interval must be a number of seconds >= 0, got {save_interval!r}")
    models = {"strong": strong_model, "weak": weak_model}
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}_model must be a torch.nn.Module (a Hugging Face causal LM), "
                            f"got {type(model).__name__}")
    catalog = _catalog(dataset, ignore_index)
    heads = {name: hf.LMHead.of(model) for name, model in models.items()}
    for name, model in models.items():
        _check_vocabulary(f"{name}_model", model, heads[name], catalog)
    metadata = {"dataset_sha256": catalog.sha256,
                "models": {name: _model_signature(model) for name, model in models.items()}}
    checkpoint = _Checkpoint.start(output, catalog, metadata, overwrite)

    for index, tokens in enumerate(catalog.tokens):
        if tokens == 0 and not checkpoint.done(index):
            checkpoint.record(index, 0.0, 0.0, 0)
    pending = [i for i in range(len(catalog.lengths)) if not checkpoint.done(i)]
    pending.sort(key=lambda i: -catalog.lengths[i])  # stable: ties keep data-set order
    batches = [pending[start:start + batch_size] for start in range(0, len(pending), batch_size)]

    from tqdm import tqdm  # a transformers dependency; imported here to keep `import wmss` light

    bar = tqdm(total=len(catalog.lengths), initial=len(catalog.lengths) - len(pending),
               unit="ex", desc="scoring", disable=not progress)
    last_save = time.monotonic()
    try:
        with _evaluating(strong_model, weak_model):
            for indices in batches:
                batch = _batch_tensors(dataset, indices, pad_token_id, ignore_index)
                sums = {name: _entropy_sums(model, heads[name], batch, backend, ignore_index)
                        for name, model in models.items()}
                for name, values in sums.items():
                    bad = ~torch.isfinite(values)
                    if bool(bad.any()):
                        examples = [indices[row] for row in bad.nonzero().flatten().tolist()]
                        raise ValueError(
                            f"{name}_model gives non-finite entropies on dataset examples "
                            f"{examples[:8]}; in float16 this is usually overflow (load the "
                            "model in bfloat16 or float32)")
                for row, index in enumerate(indices):
                    count = catalog.tokens[index]
                    checkpoint.record(index, float(sums["strong"][row]) / count,
                                      float(sums["weak"][row]) / count, count)
                bar.update(len(indices))
                if output is not None and time.monotonic() - last_save >= save_interval:
                    checkpoint.save(output)
                    last_save = time.monotonic()
    except BaseException:
        # Keep what was computed (an interrupt, an out-of-memory error in a later batch, ...).
        if output is not None and checkpoint.dirty:
            try:
                checkpoint.save(output)
            except Exception as error:  # the original error matters more; report, don't mask
                warnings.warn(f"could not save the scores computed so far to {output}: {error}")
        raise
    finally:
        bar.close()
    if output is not None and checkpoint.dirty:
        checkpoint.save(output)
    return checkpoint.scores()
