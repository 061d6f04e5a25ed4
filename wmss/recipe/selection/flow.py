"""The selection flow: ``SelectionOptions`` -> ``select_active`` -> ``save_selection``.

One validated set of options, the active set drawn from a ``DatasetScores`` with them, its
``summarize`` report, and the files of a selection directory. ``wmss select`` and the pipeline
(``wmss train``) both go through here, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from ...defaults import ALPHA, BETA, GAMMA
from ...io import atomic_write_json
from ...validation import check_choice, check_flag, check_int
from .scores_file import DatasetScores
from .weights import (ENTROPY_TERMS, MAX_DRAWS, NORMALIZATIONS, SEED_LIMIT, TERMS,
                      _check_kept_draws, _coefficient, draw_active,
                      sampling_weights, weight_terms)

__all__ = ["ACTIVE_FILE", "SCORES_FILE", "SUMMARY_FILE", "Selection", "SelectionOptions",
           "save_selection", "select_active", "summarize"]

# The files of a selection directory (``wmss select --output-dir``, a pipeline round's
# ``selection/``): the scores (and their checkpoint), the active set, the summary.
SCORES_FILE = "scores.json"
ACTIVE_FILE = "active_indices.json"
SUMMARY_FILE = "selection_summary.json"


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
            num_draws = check_int("num_draws", num_draws, 1, MAX_DRAWS + 1)
        seed = check_int("seed", self.seed, 0, SEED_LIMIT)
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
