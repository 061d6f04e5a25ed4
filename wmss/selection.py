"""WD-DS: entropy-discrepancy selection of the active training set (SPEC section 1).

Three steps, each usable on its own:

1. ``score_dataset(strong_model, weak_model, dataset)`` -> ``DatasetScores``: for every example
   ``i``, ``H_strong_i`` and ``H_weak_i``, the mean over ``i``'s supervised target tokens of each
   model's next-token entropy under teacher forcing (nats). The entropies come from
   ``wmss.token_entropy`` on the models' final hidden states: the ``[tokens, vocab]`` logits are
   never built. Optionally checkpointed to a file and resumed (see ``score_dataset``).
2. ``sampling_weights(H_strong, H_weak)`` -> ``p`` (float64, sums to 1), the paper's Eq. 9:
   ``p_i ∝ alpha * [-dH_i]_+ + beta * H_strong_i + gamma * [dH_i]_+`` with
   ``dH_i = H_strong_i - H_weak_i``.
3. ``draw_active(p)`` -> the active set: ``|D|`` draws with replacement from ``p``, duplicates
   dropped (or kept, the authors' variant: an example drawn k times is trained k times), sorted.

``select_active(scores, SelectionOptions(...))`` runs steps 2 and 3 with one validated set of
options and ``save_selection`` writes the result (``ACTIVE_FILE``, ``SUMMARY_FILE``); both
``wmss select`` and the pipeline (``wmss train``) use them, so the two cannot drift apart.

What the three terms mean: ``[-dH]_+`` is large where the weak model is more uncertain than the
strong one (what the strong model has learned since), ``H_strong`` where the strong model itself
is uncertain (hard examples), ``[dH]_+`` where the strong model is more uncertain than the weak one
(regressions). ``weight_terms`` returns each term's part of the weight and ``summarize`` its share
of the total, for reports.

An example without any supervised target (everything masked, or a single token) has no entropy to
average: it scores ``H = 0`` with ``tokens = 0``, hence weight 0 under the paper's formula (all
three terms vanish), and is never drawn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import data, hf
from .defaults import ALPHA, BETA, GAMMA, IGNORE_INDEX
from .entropy import token_entropy
from .io import atomic_write_json
from .validation import BACKENDS, check_choice, check_flag, check_ignore_index

__all__ = [
    "ACTIVE_FILE",
    "DatasetScores",
    "SCORES_FILE",
    "SUMMARY_FILE",
    "Selection",
    "SelectionOptions",
    "check_scores_output",
    "dataset_fingerprint",
    "draw_active",
    "sampling_weights",
    "save_selection",
    "score_dataset",
    "select_active",
    "summarize",
    "weight_terms",
]

NORMALIZATIONS = ("paper", "per_term")
ENTROPY_TERMS = ("strong", "weak")
TERMS = ("alpha", "beta", "gamma")

# The files of a selection directory (``wmss select --output-dir``, a pipeline round's
# ``selection/``): the scores (and their checkpoint), the active set, the summary.
SCORES_FILE = "scores.json"
ACTIVE_FILE = "active_indices.json"
SUMMARY_FILE = "selection_summary.json"

# Version 2: the models' signature is an exact SHA-256 of their weights (version 1 summed a
# sampled probe of them, blind to most values). Version-1 files are still read by
# ``DatasetScores.load``, but ``score_dataset`` never reuses them: nothing in them can tell
# whether they were computed with the models at hand (``overwrite=True`` recomputes them).
SCORES_FORMAT, FORMAT_VERSION = "wmss.selection.scores", 2
READABLE_VERSIONS = (1, 2)

# Seeds of the draws: numpy's PCG64 takes any int >= 0; capped so they fit an int64 everywhere.
SEED_LIMIT = 2 ** 63
# numpy's multinomial counts draws in int64.
MAX_DRAWS = 2 ** 63 - 1
# keep_duplicates materialises one int64 index per draw: beyond this, 16 GiB and more.
MAX_KEPT_DRAWS = 2 ** 31
# Bytes of a tensor hashed at a time by the models' signature: a tensor on an accelerator is
# copied to the host one chunk at a time, so the host memory it takes stays this small.
HASH_CHUNK_BYTES = 16 * 2 ** 20

# Seconds between checkpoints of score_dataset's output file. Each checkpoint rewrites the whole
# file (O(examples)), so a time interval keeps the total cost bounded on large data sets.
SAVE_INTERVAL = 60.0


# --------------------------------------------------------------------------------------------
# Sampling weights
# --------------------------------------------------------------------------------------------

def _entropies(name: str, values) -> torch.Tensor:
    """``values`` as a 1-D float64 CPU tensor of valid entropies (finite, >= 0)."""
    if isinstance(values, torch.Tensor):
        if values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {values.dtype}")
        tensor = values.detach().to("cpu", torch.float64)
    else:
        try:
            tensor = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a 1-D tensor or sequence of numbers, got "
                            f"{type(values).__name__}") from None
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one entropy per example), got shape "
                         f"{tuple(tensor.shape)}")
    _check_finite_non_negative(name, tensor, "an entropy")
    return tensor


def _check_finite_non_negative(name: str, tensor: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ValueError(f"{name} must be finite, but {name}[{index}] is {tensor[index].item()} "
                         f"({int(bad.sum())} non-finite values)")
    negative = tensor < 0
    if bool(negative.any()):
        index = int(negative.nonzero()[0])
        raise ValueError(f"{name} must be >= 0 ({what}), but {name}[{index}] is "
                         f"{tensor[index].item()}")


def _coefficient(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def weight_terms(entropy_strong, entropy_weak, *, alpha: float = ALPHA, beta: float = BETA,
                 gamma: float = GAMMA, normalize: str = "paper",
                 entropy_term: str = "strong") -> dict[str, torch.Tensor]:
    """The three parts of the (unnormalised) sampling weight, per example.

    Args:
        entropy_strong, entropy_weak: ``[n]`` per-example mean entropies (tensors or sequences;
            finite, >= 0), e.g. ``DatasetScores.entropy_strong`` / ``.entropy_weak``.
        alpha, beta, gamma: the coefficients of ``[-dH]_+``, ``H`` and ``[dH]_+`` (>= 0, not all
            zero), ``dH = entropy_strong - entropy_weak``.
        normalize: ``"paper"`` (Eq. 9): the terms are used as they are. ``"per_term"`` (the
            authors' public code): each of the three term vectors is first divided by its sum
            over the data set (a term that is zero everywhere stays zero), so the coefficients
            set each term's share of the total weight directly.
        entropy_term: whose entropy the ``beta`` term uses: ``"strong"`` (the paper) or
            ``"weak"`` (the base model's, as the authors' code does).

    Returns:
        ``{"alpha": a, "beta": b, "gamma": c}``: float64 CPU ``[n]`` tensors, each already
        multiplied by its coefficient; ``a + b + c`` is proportional to the sampling weights.

    Note on the authors' code: its coefficients name the terms differently (its ``alpha``
    multiplies the entropy term, its ``beta`` ``[-dH]_+``). Here ``alpha``/``beta``/``gamma``
    keep the paper's meaning in both modes; the authors' ``(alpha=a, beta=b, gamma=c)`` is
    ``normalize="per_term", entropy_term="weak", alpha=b, beta=a, gamma=c``.
    """
    strong = _entropies("entropy_strong", entropy_strong)
    weak = _entropies("entropy_weak", entropy_weak)
    if strong.shape != weak.shape:
        raise ValueError(f"entropy_strong and entropy_weak must have the same shape (one value "
                         f"per example), got {tuple(strong.shape)} and {tuple(weak.shape)}")
    coefficients = {"alpha": _coefficient("alpha", alpha), "beta": _coefficient("beta", beta),
                    "gamma": _coefficient("gamma", gamma)}
    if not any(coefficients.values()):
        raise ValueError("alpha, beta and gamma are all 0: every example would have weight 0")
    check_choice("normalize", normalize, NORMALIZATIONS)
    check_choice("entropy_term", entropy_term, ENTROPY_TERMS)
    discrepancy = strong - weak
    terms = {
        "alpha": (-discrepancy).clamp_min(0),
        "beta": strong if entropy_term == "strong" else weak,
        "gamma": discrepancy.clamp_min(0),
    }
    if normalize == "per_term":
        terms = {name: term / term.sum() if term.sum() > 0 else term
                 for name, term in terms.items()}
    return {name: coefficients[name] * term for name, term in terms.items()}


def sampling_weights(entropy_strong, entropy_weak, *, alpha: float = ALPHA, beta: float = BETA,
                     gamma: float = GAMMA, normalize: str = "paper",
                     entropy_term: str = "strong") -> torch.Tensor:
    """WD-DS sampling probabilities, Eq. 9 of the paper (options as for ``weight_terms``).

    ``p_i ∝ alpha * [-dH_i]_+ + beta * H_strong_i + gamma * [dH_i]_+``,
    ``dH = H_strong - H_weak``.

    Returns:
        float64 CPU ``[n]``, non-negative, summing to 1. In the degenerate case where every
        example has weight 0 (every entropy 0, e.g. no example has a supervised token) it is all
        zeros, and ``draw_active`` refuses it with a ``ValueError``.

    Raises:
        ValueError: NaN, infinite or negative entropies (naming the argument and index), shape
            mismatch, negative or all-zero coefficients, unknown ``normalize``.
    """
    terms = weight_terms(entropy_strong, entropy_weak, alpha=alpha, beta=beta, gamma=gamma,
                         normalize=normalize, entropy_term=entropy_term)
    total = terms["alpha"] + terms["beta"] + terms["gamma"]
    mass = total.sum()
    return total / mass if mass > 0 else total


# --------------------------------------------------------------------------------------------
# Drawing the active set
# --------------------------------------------------------------------------------------------

def _limit_text(limit: int) -> str:
    """``limit`` for messages: ``2**63`` reads better than its 19 digits."""
    return f"2**{limit.bit_length() - 1}" if limit > 0 and limit & (limit - 1) == 0 else str(limit)


def _index_count(name: str, value, minimum: int, limit: Optional[int] = None) -> int:
    """``value`` as an int in ``[minimum, limit)``; ``TypeError`` for bools and non-integers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if limit is not None and value >= limit:
        raise ValueError(f"{name} must be < {_limit_text(limit)}, got {value}")
    return int(value)


def _check_kept_draws(num_draws: int) -> None:
    if num_draws > MAX_KEPT_DRAWS:
        raise ValueError(f"num_draws={num_draws} is too many to keep every draw: with "
                         f"keep_duplicates the active set holds one index per draw (at most "
                         f"{_limit_text(MAX_KEPT_DRAWS)} = {MAX_KEPT_DRAWS}); draw fewer, or drop "
                         "duplicates")


def draw_active(weights, num_draws: Optional[int] = None, *, seed: int = 0,
                keep_duplicates: bool = False) -> torch.Tensor:
    """The active set: ``num_draws`` draws with replacement from ``weights``.

    Args:
        weights: ``[n]`` non-negative finite weights (e.g. from ``sampling_weights``; they need
            not sum to 1: example ``i`` is drawn with probability ``weights[i] / weights.sum()``,
            and a sum beyond float64's range is fine).
        num_draws: number of draws, ``0 <= num_draws < 2**63``; ``None`` means ``n`` (the
            paper's ``|D|``).
        seed: ``0 <= seed < 2**63``; seeds numpy's ``Generator(PCG64(seed))``. The same weights,
            ``num_draws`` and seed give the same set on any machine for a given NumPy version
            (and the same set with and without ``keep_duplicates``, repeats aside).
        keep_duplicates: ``False`` (the paper): each drawn example once. ``True`` (the
            authors' code): every draw, so an example drawn ``k`` times is trained ``k`` times;
            then ``num_draws`` is at most ``2**31``.

    Returns:
        Sorted int64 CPU indices in ``[0, n)``. Unique, and example ``i`` is in it with
        probability ``1 - (1 - p_i)^num_draws``, without ``keep_duplicates``; with it, of length
        ``num_draws``, ``i`` repeated as often as it was drawn. Examples of weight 0 are never
        drawn.

    Time and memory are O(n) whatever ``num_draws``: the draws are never made one by one. How
    often each example is drawn is multinomial, so its counts are drawn at once with
    ``numpy.random.Generator.multinomial``: one binomial per example of positive weight, exact
    up to the float64 rounding of the probabilities.

    Raises:
        ValueError: weights not 1-D, not finite, negative, or all zero (no example can be drawn:
            typically no example has a supervised token, or every entropy is 0); ``num_draws``
            or ``seed`` out of range, or ``num_draws > 2**31`` with ``keep_duplicates``.
        TypeError: weights not numbers, ``num_draws``/``seed`` not ints, ``keep_duplicates`` not
            a bool.
    """
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().to("cpu", torch.float64)
    else:
        try:
            weights = torch.as_tensor(weights, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError("weights must be a 1-D tensor or sequence of numbers, got "
                            f"{type(weights).__name__}") from None
    if weights.dim() != 1:
        raise ValueError(f"weights must be 1-D (one weight per example), got shape "
                         f"{tuple(weights.shape)}")
    _check_finite_non_negative("weights", weights, "a sampling weight")
    num_draws = (len(weights) if num_draws is None
                 else _index_count("num_draws", num_draws, 0, MAX_DRAWS + 1))
    seed = _index_count("seed", seed, 0, SEED_LIMIT)
    check_flag("keep_duplicates", keep_duplicates)
    if keep_duplicates:
        _check_kept_draws(num_draws)
    values = weights.numpy()
    positive = np.flatnonzero(values > 0)
    if positive.size == 0:
        raise ValueError("weights: every example has weight 0, so nothing can be drawn "
                         "(no example has a supervised token, or every entropy is 0)")
    # Divided by the largest weight first, so that the sum cannot overflow (it is then <= n).
    # Only positive weights take part: numpy gives the last category whatever rounding leaves
    # over, which must never be an example of weight 0.
    probabilities = values[positive] / values[positive].max()
    probabilities /= probabilities.sum()
    generator = np.random.Generator(np.random.PCG64(seed))
    counts = generator.multinomial(num_draws, probabilities)
    drawn = counts > 0
    if keep_duplicates:
        active = np.repeat(positive[drawn], counts[drawn])
    else:
        active = positive[drawn]
    return torch.from_numpy(active.astype(np.int64))


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
                        f"wmss.data.encode_records returns), got {type(dataset).__name__}")
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
    if catalog.max_label >= head.weight.shape[0]:
        raise ValueError(f"{name}'s lm head has {head.weight.shape[0]} outputs but the data set "
                         f"holds label {catalog.max_label}")


def _batch_tensors(dataset, indices: list[int], pad_token_id: int, ignore_index: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` ``[B, T]``; shifted ``targets`` ``[B, T]``.

    ``targets[:, t]`` is the label of position ``t + 1``, predicted by the hidden state at ``t``
    (the HF shift, ``wmss.data.shift_labels``); padding, unsupervised positions and the last
    position hold ``ignore_index``.
    """
    batch = data.collate([dataset[i] for i in indices], pad_token_id)
    labels = torch.where(batch["attention_mask"].bool(), batch["labels"],
                         torch.full_like(batch["labels"], ignore_index))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "targets": data.shift_labels(labels, ignore_index)}


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
    hidden, bias = head.fused_inputs(hidden.to(head_device, head.weight.dtype))
    entropy = token_entropy(hidden, head.weight, batch["targets"].to(head_device), bias=bias,
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
            on its own device; see ``wmss.hf.LMHead`` for the supported heads). They run in eval
            mode without gradients; their training modes are restored afterwards.
        dataset: a sequence of ``{"input_ids": [...], "labels": [...]}`` (lists of ints, labels
            aligned with input_ids and ``ignore_index`` on unsupervised tokens), exactly what
            ``wmss.data.encode_records`` returns. Other keys are ignored.
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
    batch_size = _index_count("batch_size", batch_size, 1)
    pad_token_id = _index_count("pad_token_id", pad_token_id, 0)
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


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

def summarize(scores: DatasetScores, weights, active, *, alpha: float = ALPHA,
              beta: float = BETA, gamma: float = GAMMA, normalize: str = "paper",
              entropy_term: str = "strong", num_draws: Optional[int] = None,
              seed: Optional[int] = None, keep_duplicates: bool = False) -> dict:
    """A JSON-ready report of a selection (what ``wmss select`` prints and saves).

    Args:
        scores: the ``DatasetScores`` the selection was made from.
        weights: ``[n]`` sampling weights from ``sampling_weights`` with the options below.
        active: the indices from ``draw_active(weights, num_draws, seed=seed,
            keep_duplicates=keep_duplicates)``.
        alpha, beta, gamma, normalize, entropy_term: the weight options used (for the term
            shares; see ``weight_terms``).
        num_draws, seed, keep_duplicates: as passed to ``draw_active`` (``None`` draws: ``n``).

    ``selected`` counts the distinct examples drawn and ``active_size`` the entries of
    ``active`` (the examples trained per epoch: ``selected`` without ``keep_duplicates``,
    ``num_draws`` with it); ``duplicates = num_draws - selected`` is the number of draws that
    hit an example drawn already (trained again with ``keep_duplicates``, dropped without).
    Mean entropies are over the examples with at least one supervised target (``None`` if there
    is none). ``term_share`` is each term's share of the total unnormalised weight mass: how much
    of the sampling the ``[-dH]_+`` (alpha), ``H`` (beta) and ``[dH]_+`` (gamma) terms drive.
    ``expected_selected`` is ``sum_i 1 - (1 - p_i)^num_draws``.
    """
    terms = weight_terms(scores.entropy_strong, scores.entropy_weak, alpha=alpha, beta=beta,
                         gamma=gamma, normalize=normalize, entropy_term=entropy_term)
    mass = float(sum(term.sum() for term in terms.values()))
    n = len(scores)
    weights = torch.as_tensor(weights, dtype=torch.float64).cpu()
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},) like scores, got {tuple(weights.shape)}")
    check_flag("keep_duplicates", keep_duplicates)
    draws = n if num_draws is None else num_draws
    active = torch.as_tensor(active, dtype=torch.int64)
    selected = int(torch.unique(active).numel())
    if keep_duplicates and active.numel() != draws:
        raise ValueError(f"with keep_duplicates, active must hold one index per draw "
                         f"({draws}), got {active.numel()}")
    if not keep_duplicates and selected != active.numel():
        raise ValueError("active holds repeated indices: pass keep_duplicates=True if the "
                         "duplicate draws were kept")
    supervised = scores.tokens > 0
    discrepancy = scores.discrepancy[supervised]
    # Scaled by the largest weight first: weights whose sum overflows are still a distribution.
    largest = float(weights.max()) if n else 0.0
    probabilities = weights / largest if largest > 0 else weights
    if largest > 0:
        probabilities = probabilities / probabilities.sum()
    # 1 - (1 - p)^D via log1p/expm1: exact for tiny p and huge D, where (1 - p) rounds to 1.
    expected = (float(-torch.expm1(draws * torch.log1p(-probabilities)).sum()) if draws
                else 0.0)

    def mean(values: torch.Tensor):
        return float(values.mean()) if values.numel() else None

    return {
        "examples": n,
        "examples_without_supervised_tokens": int((~supervised).sum()),
        "supervised_tokens": int(scores.tokens.sum()),
        "selected": selected,
        "selected_fraction": selected / n if n else 0.0,
        "active_size": int(active.numel()),
        "keep_duplicates": keep_duplicates,
        "duplicates": draws - selected,
        "expected_selected": expected,
        "num_draws": draws,
        "seed": seed,
        "mean_entropy_strong": mean(scores.entropy_strong[supervised]),
        "mean_entropy_weak": mean(scores.entropy_weak[supervised]),
        "mean_discrepancy": mean(discrepancy),
        "examples_weak_more_uncertain": int((discrepancy < 0).sum()),
        "examples_strong_more_uncertain": int((discrepancy > 0).sum()),
        "term_share": {name: float(term.sum()) / mass if mass > 0 else 0.0
                       for name, term in terms.items()},
        "options": {"alpha": alpha, "beta": beta, "gamma": gamma, "normalize": normalize,
                    "entropy_term": entropy_term},
        "dataset_sha256": scores.metadata.get("dataset_sha256"),
    }


# --------------------------------------------------------------------------------------------
# One selection flow: options, the active set, its files
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SelectionOptions:
    """Every option of a WD-DS selection, checked when made (before any model is loaded).

    Attributes:
        alpha, beta, gamma: Eq. 9's coefficients (finite, >= 0, not all 0; stored as floats).
        normalize: ``"paper"`` or ``"per_term"`` (see ``weight_terms``).
        entropy_term: ``"strong"`` or ``"weak"`` (see ``weight_terms``).
        num_draws: draws with replacement, ``1 <= num_draws < 2**63`` (at most ``2**31`` with
            ``keep_duplicates``); ``None``: the data set's size, the paper's ``|D|``.
        seed: seed of the draws, ``0 <= seed < 2**63``.
        keep_duplicates: keep every draw (an example drawn k times is trained k times), as the
            authors' code does; the paper keeps each drawn example once.

    Raises:
        TypeError: a field of the wrong type (bools are not numbers here), naming it.
        ValueError: a field out of range, naming it.
    """

    alpha: float = ALPHA
    beta: float = BETA
    gamma: float = GAMMA
    normalize: str = "paper"
    entropy_term: str = "strong"
    num_draws: Optional[int] = None
    seed: int = 0
    keep_duplicates: bool = False

    def __post_init__(self):
        coefficients = {name: _coefficient(name, getattr(self, name)) for name in TERMS}
        if not any(coefficients.values()):
            raise ValueError("alpha, beta and gamma are all 0: every example would have weight 0")
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_choice("entropy_term", self.entropy_term, ENTROPY_TERMS)
        num_draws = self.num_draws
        if num_draws is not None:
            num_draws = _index_count("num_draws", num_draws, 1, MAX_DRAWS + 1)
        seed = _index_count("seed", self.seed, 0, SEED_LIMIT)
        check_flag("keep_duplicates", self.keep_duplicates)
        if self.keep_duplicates and num_draws is not None:
            _check_kept_draws(num_draws)
        # Frozen: the normalised values (floats, plain ints) are set past the dataclass guard.
        for name, value in {**coefficients, "num_draws": num_draws, "seed": seed}.items():
            object.__setattr__(self, name, value)

    def weight_options(self) -> dict:
        """The keyword arguments of ``sampling_weights``/``weight_terms``."""
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "normalize": self.normalize, "entropy_term": self.entropy_term}


@dataclass(frozen=True)
class Selection:
    """The result of ``select_active``.

    Attributes:
        weights: float64 CPU ``[n]``: the sampling probabilities (sum 1).
        active: int64 CPU ``[k]``: the sorted indices of the active set (with repeats under
            ``keep_duplicates``, then ``k = num_draws``).
        summary: ``summarize``'s report of the selection.
    """

    weights: torch.Tensor
    active: torch.Tensor
    summary: dict


def select_active(scores: DatasetScores, options: SelectionOptions) -> Selection:
    """WD-DS from per-example scores: Eq. 9 weights, the draws, their summary.

    The one selection flow of ``wmss select`` and the pipeline: ``sampling_weights`` with
    ``options.weight_options()``, then ``draw_active`` (``options.num_draws`` draws, ``None``:
    ``len(scores)``), then ``summarize``.

    Raises:
        TypeError: ``scores`` not a ``DatasetScores``, ``options`` not a ``SelectionOptions``.
        ValueError: every example has weight 0 (see ``draw_active``), or ``keep_duplicates``
            with a data set of more than ``2**31`` examples and no ``num_draws``.
    """
    if not isinstance(scores, DatasetScores):
        raise TypeError(f"scores must be a DatasetScores, got {type(scores).__name__}")
    if not isinstance(options, SelectionOptions):
        raise TypeError(f"options must be a SelectionOptions, got {type(options).__name__}")
    weight_options = options.weight_options()
    num_draws = len(scores) if options.num_draws is None else options.num_draws
    weights = sampling_weights(scores.entropy_strong, scores.entropy_weak, **weight_options)
    active = draw_active(weights, num_draws, seed=options.seed,
                         keep_duplicates=options.keep_duplicates)
    summary = summarize(scores, weights, active, num_draws=num_draws, seed=options.seed,
                        keep_duplicates=options.keep_duplicates, **weight_options)
    return Selection(weights, active, summary)


def save_selection(selection: Selection, directory: str | os.PathLike,
                   extra_summary: Optional[Mapping] = None) -> None:
    """Write ``ACTIVE_FILE`` and ``SUMMARY_FILE`` into ``directory`` (created if missing).

    ``ACTIVE_FILE`` is ``selection.active`` as a JSON list of ints; ``SUMMARY_FILE`` is
    ``selection.summary`` with the entries of ``extra_summary`` (e.g. the data and model paths)
    added. Each file is written atomically and replaces any file of that name: whether existing
    files may be replaced is the caller's decision. Both documents are checked to be JSON before
    either file is touched.

    Raises:
        TypeError: ``selection`` not a ``Selection``, ``extra_summary`` not a mapping, or a
            summary value JSON cannot hold.
        ValueError: ``extra_summary`` would replace one of the summary's own entries, or holds
            a NaN or infinity.
    """
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection, got {type(selection).__name__}")
    directory = os.fspath(directory)
    extra_summary = {} if extra_summary is None else extra_summary
    if not isinstance(extra_summary, Mapping):
        raise TypeError(f"extra_summary must be a dict or None, got "
                        f"{type(extra_summary).__name__}")
    clashes = sorted(set(extra_summary) & set(selection.summary))
    if clashes:
        raise ValueError(f"extra_summary would replace the summary's own entries {clashes}")
    summary = {**selection.summary, **extra_summary}
    json.dumps(summary, allow_nan=False)  # fails here, before the active set is written
    os.makedirs(directory, exist_ok=True)
    atomic_write_json(os.path.join(directory, ACTIVE_FILE), selection.active.tolist())
    atomic_write_json(os.path.join(directory, SUMMARY_FILE), summary, indent=2)
