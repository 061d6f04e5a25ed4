"""WD-DS's Eq. 9 sampling weights and the draws of the active set.

``weight_terms`` splits each example's unnormalised weight into its three terms,
``sampling_weights`` turns them into probabilities, ``draw_active`` draws the active set from them.
The argument checks here (``_coefficient`` and friends) are shared by the rest of the package.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch

from ...defaults import ALPHA, BETA, GAMMA
from ...validation import check_choice, check_flag, check_int, limit_text

__all__ = ["ENTROPY_TERMS", "MAX_DRAWS", "MAX_KEPT_DRAWS", "NORMALIZATIONS", "SEED_LIMIT", "TERMS",
           "draw_active", "sampling_weights", "weight_terms"]

NORMALIZATIONS = ("paper", "per_term")
ENTROPY_TERMS = ("strong", "weak")
TERMS = ("alpha", "beta", "gamma")

# Seeds of the draws: numpy's PCG64 takes any int >= 0; capped so they fit an int64 everywhere.
SEED_LIMIT = 2 ** 63
# numpy's multinomial counts draws in int64.
MAX_DRAWS = 2 ** 63 - 1
# keep_duplicates materialises one int64 index per draw: beyond this, 16 GiB and more.
MAX_KEPT_DRAWS = 2 ** 31


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

def _check_kept_draws(num_draws: int) -> None:
    if num_draws > MAX_KEPT_DRAWS:
        raise ValueError(f"num_draws={num_draws} is too many to keep every draw: with "
                         f"keep_duplicates the active set holds one index per draw (at most "
                         f"{limit_text(MAX_KEPT_DRAWS)} = {MAX_KEPT_DRAWS}); draw fewer, or drop "
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
                 else check_int("num_draws", num_draws, 0, MAX_DRAWS + 1))
    seed = check_int("seed", seed, 0, SEED_LIMIT)
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
