"""The scores file: ``DatasetScores`` (per-example entropies) and its JSON format on disk.

``DatasetScores.save``/``load`` write and read complete files; ``_scores_document`` and
``_read_scores_file`` are shared with the resumable checkpoint of ``score_dataset``
(``signatures._Checkpoint``), which writes the same format with unscored entries left ``null``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from ...io import atomic_write_json

__all__ = ["DatasetScores", "FORMAT_VERSION", "READABLE_VERSIONS", "SCORES_FORMAT"]

# Version 2: the models' signature is an exact SHA-256 of their weights (version 1 summed a
# sampled probe of them, blind to most values). Version-1 files are still read by
# ``DatasetScores.load``, but ``score_dataset`` never reuses them: nothing in them can tell
# whether they were computed with the models at hand (``overwrite=True`` recomputes them).
SCORES_FORMAT, FORMAT_VERSION = "wmss.selection.scores", 2
READABLE_VERSIONS = (1, 2)


# --------------------------------------------------------------------------------------------
# Per-example scores
# --------------------------------------------------------------------------------------------

@dataclass
class DatasetScores:
    """Per-example WD-DS scores of a data set, in data-set order.

    Attributes:
        entropy_strong: float64 ``[n]``: mean next-token entropy (nats) of the strong model over
            each example's supervised targets; 0 where ``tokens`` is 0.
        entropy_weak: float64 ``[n]``: the same for the weak model.
        tokens: int64 ``[n]``: number of supervised targets (after the HF shift).
        metadata: what the scores belong to: ``dataset_sha256`` (see ``dataset_fingerprint``)
            and ``models`` (each model's class, size, dtype and the SHA-256 of all its weights);
            saved with the scores.
    """

    entropy_strong: torch.Tensor
    entropy_weak: torch.Tensor
    tokens: torch.Tensor
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.entropy_strong = torch.as_tensor(self.entropy_strong, dtype=torch.float64).cpu()
        self.entropy_weak = torch.as_tensor(self.entropy_weak, dtype=torch.float64).cpu()
        self.tokens = torch.as_tensor(self.tokens, dtype=torch.int64).cpu()
        shapes = {t.shape for t in (self.entropy_strong, self.entropy_weak, self.tokens)}
        if len(shapes) != 1 or self.tokens.dim() != 1:
            raise ValueError("entropy_strong, entropy_weak and tokens must be 1-D and of equal "
                             f"length, got shapes {[tuple(s) for s in shapes]}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def discrepancy(self) -> torch.Tensor:
        """``dH = entropy_strong - entropy_weak``, float64 ``[n]``."""
        return self.entropy_strong - self.entropy_weak

    def to_json(self) -> dict:
        """The scores file's document (see ``save``)."""
        return _scores_document(self.entropy_strong.tolist(), self.entropy_weak.tolist(),
                                self.tokens.tolist(), self.metadata, complete=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the scores file atomically.

        Format: one JSON object ``{"format": "wmss.selection.scores", "version": 2,
        "complete": bool, "num_examples": n, "dataset_sha256": str, "models": {"strong":
        {...}, "weak": {...}}, "entropy_strong": [...], "entropy_weak": [...], "tokens":
        [...]}``, the three lists in data-set order; each model's entry is ``{"class",
        "num_parameters", "dtype", "sha256", "tensors_without_data"}``. A checkpoint of an
        interrupted ``score_dataset`` has ``"complete": false`` and ``null`` in all three lists
        for the examples not scored yet. Version 1 (whose model entries hold a sampled
        ``"probe"`` instead of ``"sha256"``) is still read by ``load``.
        """
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DatasetScores":
        """Read a complete scores file, version 1 or 2 (``ValueError`` for anything else, e.g.
        a checkpoint)."""
        document = _read_scores_file(path)
        if not document["complete"]:
            missing = sum(t is None for t in document["tokens"])
            raise ValueError(f"{path}: scoring was interrupted ({missing} of "
                             f"{document['num_examples']} examples not scored yet); run "
                             "score_dataset (or wmss select) with this output again to finish")
        return cls(document["entropy_strong"], document["entropy_weak"], document["tokens"],
                   {"dataset_sha256": document["dataset_sha256"], "models": document["models"]})


def _scores_document(strong: list, weak: list, tokens: list, metadata: dict, *,
                     complete: bool) -> dict:
    return {"format": SCORES_FORMAT, "version": FORMAT_VERSION, "complete": complete,
            "num_examples": len(tokens), "dataset_sha256": metadata.get("dataset_sha256"),
            "models": metadata.get("models"), "entropy_strong": strong, "entropy_weak": weak,
            "tokens": tokens}


def _read_scores_file(path) -> dict:
    """Parse and check a scores file; ``ValueError`` naming the file if it is not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a wmss scores file (not valid JSON: "
                         f"{error.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a wmss scores file (not UTF-8 text)") from None
    if not isinstance(document, dict) or document.get("format") != SCORES_FORMAT:
        raise ValueError(f"{path} is not a wmss scores file (no \"format\": \"{SCORES_FORMAT}\")")
    if document.get("version") not in READABLE_VERSIONS or isinstance(document["version"], bool):
        raise ValueError(f"{path}: scores file version {document.get('version')!r} is not "
                         f"supported (this wmss reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")
    n = document.get("num_examples")
    columns = ("entropy_strong", "entropy_weak", "tokens")
    if not isinstance(n, int) or any(not isinstance(document.get(c), list) or
                                     len(document[c]) != n for c in columns):
        raise ValueError(f"{path}: malformed scores file (num_examples and the lengths of "
                         f"{', '.join(columns)} disagree)")
    for i in range(n):
        values = [document[c][i] for c in columns]
        if values != [None] * 3 and not _valid_entry(*values):
            raise ValueError(f"{path}: malformed entry for example {i}: {values}")
    if document.get("complete") is not all(t is not None for t in document["tokens"]):
        raise ValueError(f"{path}: malformed scores file (\"complete\" disagrees with the "
                         "entries)")
    return document


def _valid_entry(strong, weak, tokens) -> bool:
    """A scored example: two finite entropies >= 0 and a token count >= 0."""
    def entropy(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value) and value >= 0

    return entropy(strong) and entropy(weak) and isinstance(tokens, int) and \
        not isinstance(tokens, bool) and tokens >= 0
