"""Cataloguing a tokenised data set: one checked pass giving its fingerprint and shape.

``_catalog`` validates every example (naming the first bad one) and records what scoring needs:
lengths, supervised-token counts, the largest token id and label, and the SHA-256 that
``dataset_fingerprint`` returns and scores files are matched against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...defaults import IGNORE_INDEX

__all__ = ["dataset_fingerprint"]


def dataset_fingerprint(dataset: Sequence[Mapping], ignore_index: int = IGNORE_INDEX) -> str:
    """SHA-256 (hex) of a tokenised data set: its size and every example's ids and labels."""
    return _catalog(dataset, ignore_index).sha256


@dataclass
class _Catalog:
    """What scoring needs to know about the data set, from one pass over it."""

    sha256: str
    lengths: list[int]
    tokens: list[int]        # supervised targets per example, after the shift
    max_input_id: int
    max_label: int


def _catalog(dataset, ignore_index: int) -> _Catalog:
    # Any indexable sequence: a list, or a datasets.Dataset (which is not an abc.Sequence).
    if isinstance(dataset, (str, bytes, Mapping)) or not (hasattr(dataset, "__len__") and
                                                          hasattr(dataset, "__getitem__")):
        raise TypeError("dataset must be a sequence of {'input_ids', 'labels'} dicts (as "
                        f"wmss.recipe.data.encode_records returns), got {type(dataset).__name__}")
    digest = hashlib.sha256(b"wmss.selection.dataset/1")
    digest.update(np.asarray([len(dataset), ignore_index], dtype="<i8").tobytes())
    lengths, tokens, max_input_id, max_label = [], [], -1, -1
    for i, example in enumerate(dataset):
        if not isinstance(example, Mapping) or "input_ids" not in example or \
                "labels" not in example:
            raise ValueError(f"dataset[{i}] must be a dict with 'input_ids' and 'labels'")
        ids = _int_array(f"dataset[{i}]['input_ids']", example["input_ids"])
        labels = _int_array(f"dataset[{i}]['labels']", example["labels"])
        if ids.shape != labels.shape:
            raise ValueError(f"dataset[{i}]: 'input_ids' and 'labels' must have the same length "
                             f"(labels are aligned with input_ids), got {ids.size} and "
                             f"{labels.size}")
        if ids.size and ids.min() < 0:
            raise ValueError(f"dataset[{i}]['input_ids'] holds a negative token id {ids.min()}")
        supervised = labels[1:] != ignore_index
        if supervised.any() and labels[1:][supervised].min() < 0:
            raise ValueError(f"dataset[{i}]['labels'] holds {labels[1:][supervised].min()}, "
                             f"neither a token id nor ignore_index={ignore_index}")
        digest.update(np.asarray([ids.size], dtype="<i8").tobytes())
        digest.update(ids.astype("<i8").tobytes())
        digest.update(labels.astype("<i8").tobytes())
        lengths.append(int(ids.size))
        tokens.append(int(supervised.sum()))
        if ids.size:
            max_input_id = max(max_input_id, int(ids.max()))
        if supervised.any():
            max_label = max(max_label, int(labels[1:][supervised].max()))
    return _Catalog(digest.hexdigest(), lengths, tokens, max_input_id, max_label)


def _int_array(name: str, values) -> np.ndarray:
    array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a flat list of ints, got {array.dtype} of shape "
                         f"{array.shape}")
    return array.astype(np.int64)
