"""Model signatures and the resume state machine of ``score_dataset``'s output file.

``_model_signature`` hashes every weight of a model exactly; ``_Checkpoint.start`` decides
whether an existing output file is resumed (same data set, same models), replaced
(``overwrite``) or refused, and ``check_scores_output`` makes the model-independent part of that
decision before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import nn

from ...defaults import IGNORE_INDEX
from ...hf import models as hf
from ...io import atomic_write_json
from ...validation import check_flag, check_ignore_index
from .catalog import _Catalog, _catalog
from .scores_file import FORMAT_VERSION, DatasetScores, _read_scores_file, _scores_document

__all__ = ["HASH_CHUNK_BYTES", "check_scores_output"]

# Bytes of a tensor hashed at a time by the models' signature: a tensor on an accelerator is
# copied to the host one chunk at a time, so the host memory it takes stays this small.
HASH_CHUNK_BYTES = 16 * 2 ** 20


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    """Feed ``tensor``'s raw bytes (row-major, native byte order) to ``digest``.

    At most ``HASH_CHUNK_BYTES`` of it exist on the host at a time: a contiguous tensor is
    streamed as ``uint8`` views of its storage (which also covers bfloat16 and any other dtype
    numpy lacks), a tensor on an accelerator one chunk copied to the host at a time, and a
    non-contiguous one in blocks of rows, each copied contiguous on its own.
    """
    tensor = tensor.detach()
    if tensor.numel() == 0:
        return
    if not tensor.is_contiguous():
        row_bytes = tensor[0].numel() * tensor.element_size()
        if tensor.dim() > 1 and row_bytes > HASH_CHUNK_BYTES:
            for row in tensor:
                _hash_tensor(digest, row)
            return
        rows = max(1, HASH_CHUNK_BYTES // row_bytes)
        for start in range(0, tensor.shape[0], rows):
            _hash_tensor(digest, tensor[start:start + rows].contiguous())
        return
    # The contiguous elements as one flat view of stride 1 (a size-1 dimension may have any
    # stride and still count as contiguous, which view(uint8) refuses).
    flat = tensor.as_strided((tensor.numel(),), (1,))
    step = max(1, HASH_CHUNK_BYTES // tensor.element_size())
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step].view(torch.uint8)
        digest.update(chunk.cpu().numpy())


def _model_signature(model: nn.Module) -> dict:
    """The identity of a model's outputs: class, size, dtype and an exact hash of its weights.

    ``sha256`` covers every parameter and buffer (non-persistent ones too, e.g. rotary
    frequencies): its name, shape, dtype and every byte of its values, so a model changed in any
    one value has another signature. It reads all the weights once (tensors on an accelerator
    are copied to the host in ``HASH_CHUNK_BYTES`` chunks). The same weights give the same hash
    on any device. Tensors on the ``meta`` device (offloaded weights) have no values to read:
    ``tensors_without_data`` counts them, and a signature with any is never taken as a match.
    """
    model = hf.unwrap(model)
    digest = hashlib.sha256(b"wmss.selection.model/2")
    without_data = 0
    for kind, tensors in (("parameter", model.named_parameters()),
                          ("buffer", model.named_buffers())):
        for name, tensor in tensors:
            # Length-prefixed, so that no two sequences of (name, shape, dtype) read the same.
            header = json.dumps([kind, name, list(tensor.shape), str(tensor.dtype)]).encode()
            digest.update(len(header).to_bytes(8, "little") + header)
            if tensor.device.type == "meta":
                without_data += 1
            else:
                _hash_tensor(digest, tensor)
    parameters = list(model.parameters())
    return {"class": type(model).__name__,
            "num_parameters": sum(p.numel() for p in parameters),
            "dtype": str(parameters[0].dtype) if parameters else None,
            "sha256": digest.hexdigest(),
            "tensors_without_data": without_data}


def _models_problem(saved, current: dict) -> Optional[str]:
    """Why the scores of models ``saved`` (a file's signatures) are not those of ``current``."""
    for name, signature in current.items():
        if signature["tensors_without_data"]:
            return (f"the {name} model's weights are not all in memory "
                    f"({signature['tensors_without_data']} tensor(s) on the meta device, e.g. "
                    "offloaded), so they cannot be checked against the ones it was computed with")
    if not isinstance(saved, dict) or set(saved) != set(current):
        return "it was computed with different models (or model dtypes)"
    for name, signature in current.items():
        other = saved[name]
        if not isinstance(other, dict) or any(other.get(key) != value
                                              for key, value in signature.items()):
            return (f"it was computed with different models (the {name} model's class, size, "
                    "dtype or weights differ)")
    return None


def _data_problem(document: dict, catalog: _Catalog) -> Optional[str]:
    """Why a scores file's ``document`` does not belong to this data set (or cannot be reused)."""
    if document["version"] != FORMAT_VERSION:
        return (f"it was written by an older wmss (scores format version "
                f"{document['version']}), whose check of the models (a sampled probe of their "
                "weights) cannot tell whether its scores are those of the models at hand")
    if document["num_examples"] != len(catalog.lengths):
        return f"it has {document['num_examples']} examples, the data set {len(catalog.lengths)}"
    if document["dataset_sha256"] != catalog.sha256:
        return "it was computed on a different data set (token ids or labels differ)"
    return None


def _existing_scores(output, catalog: _Catalog) -> tuple[Optional[dict], Optional[str]]:
    """``(document, None)`` if ``output`` is a scores file of this data set, else ``(_, why)``."""
    try:
        document = _read_scores_file(output)
    except ValueError as error:
        return None, str(error)
    return document, _data_problem(document, catalog)


def _refusal(output, problem: str) -> ValueError:
    return ValueError(f"output {os.fspath(output)!r} already exists and does not hold these "
                      f"scores: {problem}. Pass overwrite=True (wmss select --overwrite) to "
                      "replace it, or choose another output")


def check_scores_output(output: str | os.PathLike, dataset: Sequence[Mapping], *,
                        ignore_index: int = IGNORE_INDEX, overwrite: bool = False) -> None:
    """Refuse, before any model is loaded, an ``output`` that ``score_dataset`` would refuse.

    Everything but the models is checked: ``ValueError`` (the message ``score_dataset`` gives)
    if ``output`` exists and is not a scores file, or is one of another data set or of an older
    format, unless ``overwrite``; also for a malformed ``dataset``. Whether the file belongs to
    the models is only known once they are loaded (``score_dataset`` checks it).
    """
    check_flag("overwrite", overwrite)
    catalog = _catalog(dataset, check_ignore_index(ignore_index))
    if overwrite or not os.path.exists(output):
        return
    _, problem = _existing_scores(output, catalog)
    if problem is not None:
        raise _refusal(output, problem)


class _Checkpoint:
    """Scores gathered so far (``None`` = not scored yet), saved atomically on request."""

    def __init__(self, num_examples: int, metadata: dict):
        self.metadata = metadata
        self.strong: list = [None] * num_examples
        self.weak: list = [None] * num_examples
        self.tokens: list = [None] * num_examples
        self.dirty = False

    @classmethod
    def start(cls, output, catalog: _Catalog, metadata: dict, overwrite: bool) -> "_Checkpoint":
        """A fresh checkpoint, or the one in ``output`` if it belongs to this data and models."""
        checkpoint = cls(len(catalog.lengths), metadata)
        if output is None or not os.path.exists(output):
            return checkpoint
        document, problem = _existing_scores(output, catalog)
        if problem is None:
            problem = _models_problem(document["models"], metadata["models"])
        if problem is None:
            checkpoint.strong = document["entropy_strong"]
            checkpoint.weak = document["entropy_weak"]
            checkpoint.tokens = document["tokens"]
            return checkpoint
        if overwrite:
            checkpoint.dirty = True  # replaced at the first save
            return checkpoint
        raise _refusal(output, problem)

    def done(self, index: int) -> bool:
        return self.tokens[index] is not None

    def record(self, index: int, strong: float, weak: float, tokens: int) -> None:
        self.strong[index], self.weak[index], self.tokens[index] = strong, weak, tokens
        self.dirty = True

    def save(self, output) -> None:
        complete = all(t is not None for t in self.tokens)
        atomic_write_json(output, _scores_document(self.strong, self.weak, self.tokens,
                                                   self.metadata, complete=complete))
        self.dirty = False

    def scores(self) -> DatasetScores:
        return DatasetScores(self.strong, self.weak, self.tokens, dict(self.metadata))
