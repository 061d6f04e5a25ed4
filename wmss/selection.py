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
   dropped, sorted.

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
    "DatasetScores",
    "dataset_fingerprint",
    "draw_active",
    "sampling_weights",
    "score_dataset",
    "summarize",
    "weight_terms",
]

NORMALIZATIONS = ("paper", "per_term")
ENTROPY_TERMS = ("strong", "weak")
TERMS = ("alpha", "beta", "gamma")

SCORES_FORMAT, FORMAT_VERSION = "wmss.selection.scores", 1

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

def _index_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def draw_active(weights, num_draws: Optional[int] = None, *, seed: int = 0) -> torch.Tensor:
    """The active set: ``num_draws`` draws with replacement from ``weights``, deduplicated.

    Args:
        weights: ``[n]`` non-negative finite weights (e.g. from ``sampling_weights``; they need
            not sum to 1: example ``i`` is drawn with probability ``weights[i] / weights.sum()``).
        num_draws: number of draws; ``None`` means ``n`` (the paper's ``|D|``).
        seed: seeds a CPU ``torch.Generator``, so the same inputs give the same set on any
            machine (for a given PyTorch version).

    Returns:
        Sorted, unique int64 CPU indices in ``[0, n)``; example ``i`` is included with
        probability ``1 - (1 - p_i)^num_draws``. Examples of weight 0 are never drawn.

    Raises:
        ValueError: weights not 1-D, not finite, negative, or all zero (no example can be drawn:
            typically no example has a supervised token, or every entropy is 0).
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
    positive = (weights > 0).nonzero()
    if positive.numel() == 0:
        raise ValueError("weights: every example has weight 0, so nothing can be drawn "
                         "(no example has a supervised token, or every entropy is 0)")
    num_draws = len(weights) if num_draws is None else _index_count("num_draws", num_draws, 0)
    seed = _index_count("seed", seed, 0)
    if seed >= 2 ** 63:
        raise ValueError(f"seed must be < 2**63, got {seed}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Inverse-CDF sampling: draw u ~ U[0, total) and take the first index whose cumulative weight
    # exceeds it. Exact for the categorical distribution, with no limit on the number of
    # categories (torch.multinomial caps them at 2^24), and zero-weight examples are never hit.
    cumulative = torch.cumsum(weights, 0)
    targets = torch.rand(num_draws, generator=generator, dtype=torch.float64) * cumulative[-1]
    draws = torch.searchsorted(cumulative, targets, right=True)
    # u * total can round up to total itself: that draw belongs to the last positive weight.
    draws.clamp_(max=int(positive[-1]))
    return torch.unique(draws, sorted=True).to(torch.int64)


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
            and ``models`` (a light signature of each model); saved with the scores.
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

        Format: one JSON object ``{"format": "wmss.selection.scores", "version": 1,
        "complete": bool, "num_examples": n, "dataset_sha256": str, "models": {...},
        "entropy_strong": [...], "entropy_weak": [...], "tokens": [...]}``, the three lists in
        data-set order. A checkpoint of an interrupted ``score_dataset`` has ``"complete":
        false`` and ``null`` in all three lists for the examples not scored yet.
        """
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DatasetScores":
        """Read a complete scores file (``ValueError`` for anything else, e.g. a checkpoint)."""
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
    if document.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: scores file version {document.get('version')!r} is not "
                         f"supported (expected {FORMAT_VERSION})")
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


def _model_signature(model: nn.Module) -> dict:
    """A cheap identity of a model: class, size, dtype and a probe of its parameter values.

    The probe sums up to 64 evenly spaced values of every parameter (float64), which tells two
    checkpoints of one architecture apart without reading all their weights.
    """
    model = hf.unwrap(model)
    parameters = [p for p in model.parameters() if p.device.type != "meta"]
    probe = 0.0
    for p in parameters:
        if p.numel():
            flat = p.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 64)][:64].double()
            # nan_to_num: a broken model must still be described by a JSON-writable number.
            probe += float(torch.nan_to_num(sample, nan=0.0, posinf=1.0, neginf=-1.0).sum())
    return {"class": type(model).__name__,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(parameters[0].dtype) if parameters else None,
            "probe": probe}


def _same_models(saved, current: dict) -> bool:
    if not isinstance(saved, dict) or set(saved) != set(current):
        return False
    for name, signature in current.items():
        other = saved[name]
        if not isinstance(other, dict) or any(other.get(k) != signature[k]
                                              for k in ("class", "num_parameters", "dtype")):
            return False
        # Equal values probed on another device may be summed in another order.
        if not isinstance(other.get("probe"), (int, float)) or not math.isclose(
                other["probe"], signature["probe"], rel_tol=1e-9, abs_tol=1e-9):
            return False
    return True


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
        try:
            document = _read_scores_file(output)
            problem = None
            if document["num_examples"] != len(catalog.lengths):
                problem = (f"it has {document['num_examples']} examples, the data set "
                           f"{len(catalog.lengths)}")
            elif document["dataset_sha256"] != catalog.sha256:
                problem = "it was computed on a different data set (token ids or labels differ)"
            elif not _same_models(document["models"], metadata["models"]):
                problem = "it was computed with different models (or model dtypes)"
        except ValueError as error:
            document, problem = None, str(error)
        if problem is None:
            checkpoint.strong = document["entropy_strong"]
            checkpoint.weak = document["entropy_weak"]
            checkpoint.tokens = document["tokens"]
            return checkpoint
        if overwrite:
            checkpoint.dirty = True  # replaced at the first save
            return checkpoint
        raise ValueError(f"output {os.fspath(output)!r} already exists and does not hold these "
                         f"scores: {problem}. Pass overwrite=True (wmss select --overwrite) to "
                         "replace it, or choose another output")

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
            parameter probe), its scores are kept and only the missing examples are computed.
        backend: ``token_entropy`` backend ("auto", "triton", "torch", "reference").
        progress: show a tqdm progress bar (on stderr).
        ignore_index: the label of unsupervised tokens.
        overwrite: if ``output`` exists but holds something else (other data, other models, not
            a scores file), replace it instead of raising ``ValueError``.
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
              seed: Optional[int] = None) -> dict:
    """A JSON-ready report of a selection (what ``wmss select`` prints and saves).

    Args:
        scores: the ``DatasetScores`` the selection was made from.
        weights: ``[n]`` sampling weights from ``sampling_weights`` with the options below.
        active: the indices from ``draw_active(weights, num_draws, seed=seed)``.
        alpha, beta, gamma, normalize, entropy_term: the weight options used (for the term
            shares; see ``weight_terms``).
        num_draws, seed: as passed to ``draw_active`` (``None`` draws: ``n``).

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
    draws = n if num_draws is None else num_draws
    active = torch.as_tensor(active, dtype=torch.int64)
    supervised = scores.tokens > 0
    discrepancy = scores.discrepancy[supervised]
    probabilities = weights / weights.sum() if weights.sum() > 0 else weights

    def mean(values: torch.Tensor):
        return float(values.mean()) if values.numel() else None

    return {
        "examples": n,
        "examples_without_supervised_tokens": int((~supervised).sum()),
        "supervised_tokens": int(scores.tokens.sum()),
        "selected": int(active.numel()),
        "selected_fraction": active.numel() / n if n else 0.0,
        "expected_selected": float((1 - (1 - probabilities) ** draws).sum()),
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
