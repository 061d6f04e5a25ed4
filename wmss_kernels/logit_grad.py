"""Backward of the mixed-logit loss: logit gradients from recomputed tiles, then cuBLAS products.

With ``g = softmax(z_m) - onehot(y)`` and each token's upstream gradient ``c`` split into
``c_mix`` (mixed tokens) and ``c_strong`` (supervised tokens that gap masking sent to plain CE)::

    dL/dz_s = lam * c_mix * g + c_strong * (softmax(z_s) - onehot(y))
    dL/dz_w = (1 - lam) * c_mix * g

and, through the soft-cap ``z = c tanh(a / c)``, ``dL/da = dL/dz * sech^2(a / c)`` (taken from
``a``, not as ``1 - (z / c)^2``, which cancels where the cap saturates).

The upstream gradients are factored as ``c = scale * c'`` with ``scale = max |c|`` (a device
scalar, see ``_factor_coefficients``): the kernels write ``c' g``, which keeps the size of ``g``
whatever the reduction (a mean over 2^16 tokens folded into an fp16 ``g`` would flush most of it
to zero), and ``scale`` multiplies the float32 results of the products.

The ``[N, V]`` logit gradient is cut into vocabulary blocks (and, only when the tokens are too
many for a useful block, into token chunks as well). For each piece ``_logit_grad_kernel`` (a 1-D
grid over token x vocabulary tiles, in the L2-friendly order of ``logit_tiles.grouped_tile``)
recomputes both models' logit tiles on the tensor cores, forms ``dL/da`` from the forward's
log-sum-exps and writes it to a buffer in the compute dtype. Without soft-capping and gap
masking the two gradients are ``lam g`` and ``(1 - lam) g``: one buffer holds ``g`` for both
models (or for the one trained model), the products apply the scales, and in half precision
``_mixed_grad_kernel`` builds the mixed logits in a single accumulator (twice the tile). cuBLAS
then gives, per block,

    dW[block] = dA^T @ h        one product over every token, rounded once to W's dtype
    dh       += dA @ W[block]   accumulated in float32 across the vocabulary blocks
    db[block] = sum(dA)

(half-precision ``dW`` blocks go through a float32 ``[block, d]`` scratch that is scaled while
it is rounded: one rounding, counted in the budget below).

With the ``"cublas"`` logit source (``config.LOGIT_SOURCE``), cuBLAS writes both models' float32
logits of the piece and ``_loaded_grad_kernel`` overwrites them with the gradients in place.

Blocking the vocabulary (rather than the tokens) means the ``[V, d]`` weight gradient is never
read back: there are no float32 ``[V, d]`` accumulators and no round-trips through them, only the
``[N, d]`` float32 accumulator of ``dh``. Every reduction runs in a fixed order: results are
deterministic. The buffers are sized by ``config.GRAD_BUFFER_*`` (a fraction of the gradients'
own bytes); nothing ``[N, V]`` is ever allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from wmss.loss.engines.contract import (
    GradRequest,
    LogSumExps,
    MixedLossSpec,
    ModelGrads,
    ModelInputs,
    TokenCoefficients,
)

from . import config
from .logit_tiles import (
    grouped_tile,
    loaded_logits_tile,
    logits_tile,
    mixed_logits_tile,
    soft_cap,
    soft_cap_slope,
    to_storage,
)
from .products import accumulate_product, float32_output_is_free, write_product

_MASKED = tl.constexpr(config.MASKED_LOGIT)


@triton.jit
def _row_terms(labels_ptr, max_s_ptr, logsum_s_ptr, max_m_ptr, logsum_m_ptr, coef_mix_ptr,
               coef_strong_ptr, offs_n, mask_n, vocab_start, HAS_GAP: tl.constexpr):
    """Per-token inputs of the gradient for rows ``offs_n``: the label as a column of the block
    that starts at ``vocab_start``, the coefficients and the log-sum-exp pairs."""
    y = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1) - vocab_start
    coef_mix = tl.load(coef_mix_ptr + offs_n, mask=mask_n, other=0.0)
    max_m = tl.load(max_m_ptr + offs_n, mask=mask_n, other=0.0)
    logsum_m = tl.load(logsum_m_ptr + offs_n, mask=mask_n, other=0.0)
    coef_strong = tl.zeros_like(coef_mix)
    max_s = tl.zeros_like(coef_mix)
    logsum_s = tl.zeros_like(coef_mix)
    if HAS_GAP:
        coef_strong = tl.load(coef_strong_ptr + offs_n, mask=mask_n, other=0.0)
        max_s = tl.load(max_s_ptr + offs_n, mask=mask_n, other=0.0)
        logsum_s = tl.load(logsum_s_ptr + offs_n, mask=mask_n, other=0.0)
    return y, coef_mix, max_m, logsum_m, coef_strong, max_s, logsum_s


@triton.jit
def _store_logit_grads(
    a_s, a_w, offs_n, offs_v, mask, y, coef_mix, max_m, logsum_m, coef_strong, max_s, logsum_s,
    grad_s_ptr, grad_w_ptr, stride_grad_s, stride_grad_w, lam, strong_scale, softcap,
    STORE_S: tl.constexpr, STORE_W: tl.constexpr, HAS_GAP: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """Write ``dL/da`` of one tile for the strong and/or weak model (formulas in the module doc).

    ``a_s``, ``a_w``: float32 logit tiles before soft-capping (the cap and its slope are taken
    here, from ``a``); ``mask``: the tile's valid entries.
    """
    z_s, z_w = a_s, a_w
    if HAS_SOFTCAP:
        z_s, z_w = soft_cap(a_s, softcap), soft_cap(a_w, softcap)
    onehot = (offs_v[None, :] == y[:, None]).to(tl.float32)
    # softmax = exp((z - max) - log s): z - max is exact near the max, at any logit offset.
    # Lanes outside the tile's valid rows/columns are pinned to exp(MASKED) = 0 (no overflow).
    z_m = lam * z_s + (1.0 - lam) * z_w
    p_m = tl.exp(tl.where(mask, (z_m - max_m[:, None]) - logsum_m[:, None], _MASKED))
    g_mix = coef_mix[:, None] * (p_m - onehot)
    rows = offs_n.to(tl.int64)[:, None]
    if STORE_S:
        g_s = strong_scale * g_mix  # lam, or 1 when the buffer is shared by both models
        if HAS_GAP:
            p_s = tl.exp(tl.where(mask, (z_s - max_s[:, None]) - logsum_s[:, None], _MASKED))
            g_s += coef_strong[:, None] * (p_s - onehot)
        if HAS_SOFTCAP:
            g_s *= soft_cap_slope(a_s, softcap)
        tl.store(grad_s_ptr + rows * stride_grad_s + offs_v[None, :],
                 to_storage(g_s, grad_s_ptr.dtype.element_ty, ROUND_BF16), mask=mask)
    if STORE_W:
        g_w = (1.0 - lam) * g_mix
        if HAS_SOFTCAP:
            g_w *= soft_cap_slope(a_w, softcap)
        tl.store(grad_w_ptr + rows * stride_grad_w + offs_v[None, :],
                 to_storage(g_w, grad_w_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


@triton.jit
def _program_tile(num_tokens, vocab, group_size, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Rows and columns of this program's (token tile, vocabulary tile) on a 1-D grid in
    ``grouped_tile`` order, with the row mask and the tile's mask of valid entries."""
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_N),
                                tl.cdiv(vocab, BLOCK_V), group_size)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < num_tokens
    return offs_n, offs_v, mask_n, mask_n[:, None] & (offs_v < vocab)[None, :]


@triton.jit
def _logit_grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, hw_ptr, ww_ptr, bw_ptr, labels_ptr, max_s_ptr, logsum_s_ptr,
    max_m_ptr, logsum_m_ptr, coef_mix_ptr, coef_strong_ptr, grad_s_ptr, grad_w_ptr,
    num_tokens, vocab, vocab_start, dim_s, dim_w, stride_hs, stride_ws, stride_hw, stride_ww,
    stride_grad_s, stride_grad_w, group_size, lam, strong_scale, softcap,
    STORE_S: tl.constexpr, STORE_W: tl.constexpr, HAS_GAP: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_W: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ROUND_BF16: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (token tile, vocabulary tile) of the ``[num_tokens, vocab]`` block starting at
    ``vocab_start`` (1-D grid in ``grouped_tile`` order): both models' logit tiles recomputed
    with ``tl.dot``, then their gradients. The weight (and bias) pointers start at the block's
    first row."""
    offs_n, offs_v, mask_n, mask = _program_tile(num_tokens, vocab, group_size, BLOCK_N, BLOCK_V)
    y, coef_mix, max_m, logsum_m, coef_strong, max_s, logsum_s = _row_terms(
        labels_ptr, max_s_ptr, logsum_s_ptr, max_m_ptr, logsum_m_ptr, coef_mix_ptr,
        coef_strong_ptr, offs_n, mask_n, vocab_start, HAS_GAP)
    # Both models' logits are needed for the mixture's softmax, even when one takes no gradient.
    # Raw logits (before the cap): _store_logit_grads takes the cap and its slope from them.
    a_s = logits_tile(hs_ptr, ws_ptr, bs_ptr, offs_n, offs_v, num_tokens, vocab, dim_s, stride_hs,
                      stride_ws, softcap, HAS_BIAS_S, False, UPCAST_DOT, DOT_PRECISION,
                      BLOCK_N, BLOCK_V, BLOCK_D)
    a_w = logits_tile(hw_ptr, ww_ptr, bw_ptr, offs_n, offs_v, num_tokens, vocab, dim_w, stride_hw,
                      stride_ww, softcap, HAS_BIAS_W, False, UPCAST_DOT, DOT_PRECISION,
                      BLOCK_N, BLOCK_V, BLOCK_D)
    _store_logit_grads(a_s, a_w, offs_n, offs_v, mask, y, coef_mix, max_m, logsum_m, coef_strong,
                       max_s, logsum_s, grad_s_ptr, grad_w_ptr, stride_grad_s, stride_grad_w, lam,
                       strong_scale, softcap, STORE_S, STORE_W, HAS_GAP, HAS_SOFTCAP, ROUND_BF16)


@triton.jit
def _mixed_grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, hw_ptr, ww_ptr, bw_ptr, labels_ptr, max_m_ptr, logsum_m_ptr,
    coef_ptr, grad_ptr, num_tokens, vocab, vocab_start, dim_s, dim_w, stride_hs, stride_ws,
    stride_hw, stride_ww, stride_grad, group_size, strong_ratio, weak_weight,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_W: tl.constexpr, WEAK_IN_MIX: tl.constexpr,
    ROUND_BF16: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``_logit_grad_kernel`` for the paper's loss (no soft-cap, no gap masking), where both
    models' logit gradients are multiples of one ``g = c (softmax(z_m) - onehot(y))``: only the
    mixed logits are needed, built in a single accumulator (``mixed_logits_tile``), and ``g`` is
    written once to the buffer both models' products read."""
    offs_n, offs_v, mask_n, mask = _program_tile(num_tokens, vocab, group_size, BLOCK_N, BLOCK_V)
    y = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1) - vocab_start
    coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
    max_m = tl.load(max_m_ptr + offs_n, mask=mask_n, other=0.0)
    logsum_m = tl.load(logsum_m_ptr + offs_n, mask=mask_n, other=0.0)
    z_m = mixed_logits_tile(hs_ptr, ws_ptr, bs_ptr, hw_ptr, ww_ptr, bw_ptr, offs_n, offs_v,
                            num_tokens, vocab, dim_s, dim_w, stride_hs, stride_ws, stride_hw,
                            stride_ww, strong_ratio, weak_weight, HAS_BIAS_S, HAS_BIAS_W,
                            WEAK_IN_MIX, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    onehot = (offs_v[None, :] == y[:, None]).to(tl.float32)
    p_m = tl.exp(tl.where(mask, (z_m - max_m[:, None]) - logsum_m[:, None], _MASKED))
    g = coef[:, None] * (p_m - onehot)
    rows = offs_n.to(tl.int64)[:, None]
    tl.store(grad_ptr + rows * stride_grad + offs_v[None, :],
             to_storage(g, grad_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


@triton.jit
def _loaded_grad_kernel(
    zs_ptr, zw_ptr, bs_ptr, bw_ptr, labels_ptr, max_s_ptr, logsum_s_ptr, max_m_ptr, logsum_m_ptr,
    coef_mix_ptr, coef_strong_ptr, grad_s_ptr, grad_w_ptr, num_tokens, width, vocab_start,
    stride_grad_s, stride_grad_w, lam, strong_scale, softcap,
    STORE_S: tl.constexpr, STORE_W: tl.constexpr, HAS_GAP: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_W: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The ``"cublas"`` logit source: the gradients of a ``[num_tokens, width]`` block of raw
    float32 logits that cuBLAS wrote, written IN PLACE over those logits.

    Each program owns whole rows and walks their columns in order, so writing a gradient entry
    of ``e <= 4`` bytes at ``row * 4 * width + e * column`` only ever overwrites logits of the
    same row that it has already read (``e * column <= 4 * column``), and never ones it will read.
    ``stride_grad_*`` are the row strides in gradient elements (``4 * width / e``).
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    y, coef_mix, max_m, logsum_m, coef_strong, max_s, logsum_s = _row_terms(
        labels_ptr, max_s_ptr, logsum_s_ptr, max_m_ptr, logsum_m_ptr, coef_mix_ptr,
        coef_strong_ptr, offs_n, mask_n, vocab_start, HAS_GAP)
    for c0 in range(0, width, BLOCK_V):
        offs_v = c0 + tl.arange(0, BLOCK_V)
        mask = mask_n[:, None] & (offs_v < width)[None, :]
        a_s = loaded_logits_tile(zs_ptr, bs_ptr, offs_n, offs_v, num_tokens, width, width,
                                 softcap, HAS_BIAS_S, False)
        a_w = loaded_logits_tile(zw_ptr, bw_ptr, offs_n, offs_v, num_tokens, width, width,
                                 softcap, HAS_BIAS_W, False)
        # The stores below overwrite logits of columns below c0 + BLOCK_V (read in this step or
        # an earlier one), some of them another warp's share of this step's tile: without a
        # barrier, a warp that runs ahead could overwrite logits that a slower warp has not loaded
        # yet. After it, every read of columns below c0 + BLOCK_V is done, and later steps read
        # only columns from c0 + BLOCK_V on, which no store of this step reaches: no write can
        # land on a logit still to be read. (Prefetched loads of later steps read those later
        # columns too, so software pipelining does not break the argument.)
        tl.debug_barrier()
        _store_logit_grads(a_s, a_w, offs_n, offs_v, mask, y, coef_mix, max_m, logsum_m,
                           coef_strong, max_s, logsum_s, grad_s_ptr, grad_w_ptr, stride_grad_s,
                           stride_grad_w, lam, strong_scale, softcap, STORE_S, STORE_W, HAS_GAP,
                           HAS_SOFTCAP, ROUND_BF16)


@dataclass(frozen=True)
class GradBlocks:
    """How the backward cuts the ``[N, V]`` logit gradient: ``token_chunk`` x ``vocab_block``."""

    token_chunk: int
    vocab_block: int

    def __post_init__(self) -> None:
        if self.token_chunk < 1 or self.vocab_block < 1:
            raise ValueError(f"GradBlocks must be positive, got {self}")


def gradient_buffer_budget(gradient_bytes: int) -> int:
    """Bytes the logit-gradient buffers may take, for gradients of ``gradient_bytes`` in all."""
    budget = int(config.GRAD_BUFFER_FRACTION * gradient_bytes)
    return min(max(budget, config.GRAD_BUFFER_MIN_BYTES), config.GRAD_BUFFER_MAX_BYTES)


def plan_grad_blocks(num_tokens: int, vocab: int, bytes_per_entry: int, budget_bytes: int,
                     tiles: config.Tiles, bytes_per_column: int = 0) -> GradBlocks:
    """The largest pieces whose buffers fit ``budget_bytes``: ``bytes_per_entry`` per logit of the
    piece, plus ``bytes_per_column`` per vocabulary column when every token is in one chunk (the
    float32 weight-gradient scratch of half-precision weights, see ``_ModelOutputs``).

    Every token in one chunk is preferred: each weight-gradient block is then one product over all
    tokens, written once. Only when that leaves a vocabulary block narrower than
    ``config.MIN_GRAD_VOCAB_BLOCK`` are the tokens cut into chunks too. Blocks are tile-aligned.
    """
    num_tokens, bytes_per_entry = max(num_tokens, 1), max(bytes_per_entry, 1)
    per_column = num_tokens * bytes_per_entry + bytes_per_column
    vocab_block = budget_bytes // per_column // tiles.block_v * tiles.block_v
    narrowest = min(vocab, max(config.MIN_GRAD_VOCAB_BLOCK, tiles.block_v))
    if vocab_block >= narrowest:
        return GradBlocks(num_tokens, min(vocab_block, vocab))
    chunk = budget_bytes // (narrowest * bytes_per_entry) // tiles.block_n * tiles.block_n
    if chunk >= num_tokens:
        # Every token fits in one chunk of the narrowest block, but not with the dW scratch:
        # keep all tokens (cutting them would need float32 [V, d] accumulators, far larger) in a
        # block narrowed to the budget.
        return GradBlocks(num_tokens, max(vocab_block, tiles.block_v))
    return GradBlocks(min(max(chunk, tiles.block_n), num_tokens), narrowest)


def _factor_coefficients(coefficients: TokenCoefficients) -> tuple[torch.Tensor, TokenCoefficients]:
    """``(scale, coefficients / scale)`` with ``scale = max |c|`` (a float32 0-d tensor; 1 when
    every coefficient is 0).

    The kernels write ``(c_n / scale) * g``, of the size of ``g`` whatever the reduction: folding
    ``c_n = 1/N`` into a half-precision gradient would flush most softmax entries of an fp16
    ``g`` to zero at N ~ 16k (and cost bf16 nothing but buys it nothing either). ``scale`` then
    multiplies the float32 results of the products on the device: no host synchronisation.
    """
    coef_mix, coef_strong = coefficients
    peak = coef_mix.abs().amax()
    if coef_strong is not None:
        peak = torch.maximum(peak, coef_strong.abs().amax())
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))
    return scale, TokenCoefficients(coef_mix / scale,
                                    None if coef_strong is None else coef_strong / scale)


class _ModelOutputs:
    """One model's requested gradients, the float32 accumulators behind them, and the final
    multiplication by the coefficients' ``scale`` (see ``_factor_coefficients``).

    ``dh`` accumulates in float32 (in place for float32 hidden states, else per token chunk) and is
    scaled as the chunk finishes. With one token chunk each ``dW`` block is one product over every
    token: float32 weights take it in place and are scaled there; half-precision weights take it
    through the float32 ``scratch`` (``[block, d]``), scaled while rounding once to their dtype.
    With several chunks ``dW`` accumulates in float32 and is scaled and rounded at the end.
    """

    def __init__(self, request: GradRequest, hidden, weight, token_chunk: int, single_chunk: bool,
                 scale: torch.Tensor, scratch: Optional[torch.Tensor]):
        self.weight_dtype, self.scale = weight.dtype, scale
        self.dh = self.dh_acc = None
        if request.hidden:
            in_place = hidden.dtype == torch.float32
            self.dh = torch.empty_like(hidden)
            self.dh_acc = None if in_place else torch.empty(
                (token_chunk, hidden.shape[1]), device=hidden.device, dtype=torch.float32)
        self.write_dw = single_chunk
        self.dw = None
        if request.weight:
            dtype = weight.dtype if single_chunk else torch.float32
            self.dw = (torch.empty if single_chunk else torch.zeros)(
                weight.shape, device=weight.device, dtype=dtype)
        self.scratch = scratch if self.needs_scratch(request, weight, single_chunk) else None
        self.db = torch.zeros(weight.shape[0], device=weight.device,
                              dtype=torch.float32) if request.bias else None

    @staticmethod
    def needs_scratch(request: GradRequest, weight, single_chunk: bool) -> bool:
        """Half-precision weights written in one piece take their dW blocks through the float32
        scratch, except on CUDA without ``out_dtype=`` (PyTorch < 2.8), where a float32 product
        would copy the hidden states to float32 for every block: there the block is written in
        the weights' dtype and scaled in place (one more rounding)."""
        return (request.weight and single_chunk and weight.dtype != torch.float32
                and float32_output_is_free(weight.device))

    def start_chunk(self, tokens: slice) -> Optional[torch.Tensor]:
        """The float32 ``[rows, d]`` accumulator of ``dh[tokens]``, zeroed."""
        if self.dh is None:
            return None
        rows = tokens.stop - tokens.start
        acc = self.dh[tokens] if self.dh_acc is None else self.dh_acc[:rows]
        return acc.zero_()

    def add_block(self, dh_acc, grad, alpha: float, hidden, weight_block, vocab: slice) -> None:
        """Add one ``[rows, block]`` logit gradient's products."""
        if dh_acc is not None:
            accumulate_product(dh_acc, grad, weight_block, alpha)
        if self.dw is not None:
            dw = self.dw[vocab]
            if not self.write_dw:
                accumulate_product(dw, grad.t(), hidden, alpha)
            elif self.scratch is None:
                write_product(dw, grad.t(), hidden, alpha)
                dw.mul_(self.scale)
            else:
                product = self.scratch[:dw.numel()].view(dw.shape)
                write_product(product, grad.t(), hidden, alpha)
                torch.mul(product, self.scale, out=dw)
        if self.db is not None:
            self.db[vocab].add_(grad.sum(dim=0, dtype=torch.float32), alpha=alpha)

    def finish_chunk(self, tokens: slice, dh_acc) -> None:
        if dh_acc is None:
            return
        if self.dh_acc is None:
            dh_acc.mul_(self.scale)
        else:
            torch.mul(dh_acc, self.scale, out=self.dh[tokens])

    def grads(self) -> ModelGrads:
        dw = self.dw
        if dw is not None and not self.write_dw:
            dw = dw.mul_(self.scale).to(self.weight_dtype)
        db = None if self.db is None else self.db.mul_(self.scale)
        return ModelGrads(self.dh, dw, db)


def _zero_grads(request: GradRequest, hidden, weight) -> ModelGrads:
    """A model's requested gradients when there are no tokens: all zero."""
    def zeros(needed, like, dtype):
        return torch.zeros(like.shape, device=like.device, dtype=dtype) if needed else None
    return ModelGrads(zeros(request.hidden, hidden, hidden.dtype),
                      zeros(request.weight, weight, weight.dtype),
                      zeros(request.bias, weight[:, 0], torch.float32))


def _gradient_bytes(request: GradRequest, hidden, weight) -> int:
    return ((hidden.numel() * hidden.element_size() if request.hidden else 0)
            + (weight.numel() * weight.element_size() if request.weight else 0))


class _BlockGrads:
    """Produces the logit gradients of one (token chunk, vocabulary block) piece.

    ``"triton"`` source: ``_logit_grad_kernel`` recomputes the logit tiles with ``tl.dot`` and
    writes the gradients to buffers in the models' dtypes. ``"cublas"`` source: cuBLAS writes
    both models' float32 logits, and ``_loaded_grad_kernel`` overwrites them with the gradients.
    Returns ``(g_s, g_w)``: ``[rows, width]`` matrices (``g_w is g_s`` when ``shared``; None for a
    model that is not stored).
    """

    def __init__(self, source: str, tiles: config.Tiles, chunk: int, block: int,
                 strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor, lse: LogSumExps,
                 coefficients: TokenCoefficients, *, lam: float, softcap: Optional[float],
                 store_s: bool, store_w: bool, shared: bool, one_gradient: bool):
        self.source, self.tiles, self.shared = source, tiles, shared
        self.one_gradient = one_gradient
        self.heads = strong, weak
        (hs, _, bs), (hw, _, bw) = strong, weak
        self.store = store_s, store_w
        has_gap = coefficients.strong is not None
        self.unused = lse.max_mix  # placeholder for pointers a launch never dereferences
        self.row_inputs = (labels, *lse, coefficients.mix,
                           coefficients.strong if has_gap else self.unused)
        self.lam = float(lam)
        self.scalars = (self.lam, 1.0 if shared else self.lam, float(softcap or 1.0))
        # Token tiles per L2 group (grouped_tile): both models' hidden rows count.
        self.group_size = min(config.token_tiles_per_group(
            tiles.block_n, hs.shape[1] * hs.element_size() + hw.shape[1] * hw.element_size()),
            triton.cdiv(chunk, tiles.block_n))  # no larger than the grid (int32 program ids)
        self.flags = dict(STORE_S=store_s, STORE_W=store_w, HAS_GAP=has_gap,
                          HAS_BIAS_S=bs is not None, HAS_BIAS_W=bw is not None,
                          HAS_SOFTCAP=softcap is not None,
                          ROUND_BF16=config.round_bf16_by_hand())
        device = hs.device
        if source == "cublas":
            self.buffers = [torch.empty(chunk * block, device=device, dtype=torch.float32)
                            for _ in range(2)]
        else:
            self.buffers = [torch.empty(chunk * block, device=device, dtype=h.dtype) if stored
                            else None for h, stored in ((hs, store_s), (hw, store_w))]

    def __call__(self, tokens: slice, columns: slice):
        rows, width = tokens.stop - tokens.start, columns.stop - columns.start
        heads = [(h[tokens], w[columns], self.unused if b is None else b[columns])
                 for h, w, b in self.heads]
        row_inputs = [t[tokens] for t in self.row_inputs]
        if self.source == "cublas":
            return self._from_cublas(rows, width, columns.start, heads, row_inputs)
        return self._by_recompute(rows, width, columns.start, heads, row_inputs)

    def _by_recompute(self, rows, width, vocab_start, heads, row_inputs):
        (hs, ws, bs), (hw, ww, bw) = heads
        g_s, g_w = self._stored([None if buf is None else buf[:rows * width].view(rows, width)
                                 for buf in self.buffers])
        tiles = self.tiles
        grid = (triton.cdiv(rows, tiles.block_n) * triton.cdiv(width, tiles.block_v),)
        launch = dict(UPCAST_DOT=config.upcast_dot_operands(),
                      DOT_PRECISION=config.dot_precision(), BLOCK_N=tiles.block_n,
                      BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
                      num_stages=tiles.num_stages)
        if self.one_gradient:
            labels, _, _, max_mix, logsum_mix, coef_mix, _ = row_inputs
            weak_in_mix = self.lam < 1.0
            _mixed_grad_kernel[grid](
                hs, ws, bs, hw, ww, bw, labels, max_mix, logsum_mix, coef_mix,
                g_s if g_s is not None else g_w, rows, width,
                vocab_start, hs.shape[1], hw.shape[1], hs.stride(0), ws.stride(0), hw.stride(0),
                ww.stride(0), width, self.group_size,
                self.lam / (1.0 - self.lam) if weak_in_mix else 1.0,
                1.0 - self.lam if weak_in_mix else 1.0, HAS_BIAS_S=self.flags["HAS_BIAS_S"],
                HAS_BIAS_W=self.flags["HAS_BIAS_W"], WEAK_IN_MIX=weak_in_mix,
                ROUND_BF16=self.flags["ROUND_BF16"], **launch)
            return g_s, g_w
        _logit_grad_kernel[grid](
            hs, ws, bs, hw, ww, bw, *row_inputs, *self._pointers(g_s, g_w), rows, width,
            vocab_start, hs.shape[1], hw.shape[1], hs.stride(0), ws.stride(0), hw.stride(0),
            ww.stride(0), width, width, self.group_size, *self.scalars, **self.flags, **launch)
        return g_s, g_w

    def _from_cublas(self, rows, width, vocab_start, heads, row_inputs):
        logits = [buf[:rows * width].view(rows, width) for buf in self.buffers]
        for logit, (h, w, _) in zip(logits, heads):
            write_product(logit, h, w.t())
        # The gradients overwrite the logits: viewed in the model's dtype, each float32 row of
        # ``width`` entries holds ``ratio * width`` of them, of which the first ``width`` are the
        # gradient's row.
        grads = []
        for (h, _, _), logit in zip(heads, logits):
            ratio = 4 // h.element_size()
            grads.append(logit.view(-1).view(h.dtype).view(rows, ratio * width)[:, :width])
        g_s, g_w = self._stored(grads)
        tiles = config.loaded_tiles(config.device_arch(logits[0].device))
        _loaded_grad_kernel[(triton.cdiv(rows, tiles.block_n),)](
            *logits, heads[0][2], heads[1][2], *row_inputs, *self._pointers(g_s, g_w), rows,
            width, vocab_start, grads[0].stride(0), grads[1].stride(0), *self.scalars,
            **self.flags, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        return g_s, g_w

    def _stored(self, grads):
        """``(g_s, g_w)`` from the per-model matrices: None where not stored, shared if so."""
        g_s = grads[0] if self.store[0] else None
        g_w = grads[1] if self.store[1] else (g_s if self.shared else None)
        return g_s, g_w

    @staticmethod
    def _pointers(g_s, g_w):
        """Kernel pointer arguments: a stand-in (never written) for a model that is not stored."""
        return (g_s if g_s is not None else g_w), (g_w if g_w is not None else g_s)


def mixed_ce_backward(
    strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor, lse: LogSumExps,
    coefficients: TokenCoefficients, spec: MixedLossSpec,
    requests: tuple[GradRequest, GradRequest], *, tiles: Optional[config.Tiles] = None,
    blocks: Optional[GradBlocks] = None, logit_source: Optional[str] = None,
) -> tuple[ModelGrads, ModelGrads]:
    """Gradients of ``sum_n c_n * loss_n`` with respect to both models' inputs.

    Args:
        strong, weak: as in ``fused_stats.mixed_token_stats``.
        labels: ``[N]`` int64.
        lse: float32 ``[N]`` log-sum-exps of the strong and mixed logits from the forward, as
            (max, log-sum) pairs.
        coefficients: float32 ``[N]`` upstream gradients: ``mix`` of mixed tokens (0
            elsewhere); ``strong`` of supervised tokens trained with plain strong CE under gap
            masking (0 elsewhere), None when gap masking is off.
        spec: ``lam`` and ``softcap`` are used (gap masking is in the coefficients).
        requests: ``(strong, weak)``, which gradients to compute; the others come back as None
            and cost nothing (no weak request at all skips the weak products and buffers).
        tiles, blocks, logit_source: launch overrides (tests, tuning); ``blocks`` defaults to
            ``plan_grad_blocks`` under ``gradient_buffer_budget``, ``logit_source`` to
            ``config.LOGIT_SOURCE``; ``tiles`` apply to the ``"triton"`` source.

    Returns:
        ``(strong, weak)`` ``ModelGrads``: ``hidden`` and ``weight`` grads in the inputs' dtypes,
        ``bias`` grads float32 (the caller casts them to the parameters' dtypes).
    """
    lam, softcap = spec.lam, spec.softcap
    strong_request, weak_request = requests
    strong_hidden, strong_weight, _ = strong
    weak_hidden, weak_weight, _ = weak
    num_tokens, vocab = strong_hidden.shape[0], strong_weight.shape[0]
    store_s, store_w = strong_request.any, weak_request.any
    has_gap = coefficients.strong is not None
    # Without soft-capping and gap masking, dL/dz_s = lam g and dL/dz_w = (1 - lam) g: one buffer
    # holds g for both models (half the bytes written and read), scaled in the products instead.
    mix_only = softcap is None and not has_gap
    shared = store_s and store_w and mix_only and strong_hidden.dtype == weak_hidden.dtype
    if shared:
        store_w = False
    source = config.logit_source(logit_source)
    # The same holds when only one model is trained (a frozen weak model): its buffer holds g.
    # For half-precision operands _mixed_grad_kernel then computes g from the mixed logits in a
    # single accumulator ("triton" source; see config.SINGLE_ACCUMULATOR_DTYPES).
    one_gradient = (mix_only and source == "triton" and not (store_s and store_w)
                    and strong_hidden.dtype in config.SINGLE_ACCUMULATOR_DTYPES
                    and weak_hidden.dtype in config.SINGLE_ACCUMULATOR_DTYPES)
    alpha_s, alpha_w = (lam, 1.0 - lam) if shared or one_gradient else (1.0, 1.0)
    if tiles is None:
        tiles = config.grad_tiles(strong_hidden.dtype, config.device_arch(strong_hidden.device),
                                  single_accumulator=one_gradient)
    if source == "cublas":  # both models' float32 logits; the gradients overwrite them in place
        bytes_per_entry = 8
    else:  # each logit gradient in its model's dtype, the operand dtype of its products
        bytes_per_entry = (strong_hidden.element_size() if store_s else 0) + (
            weak_hidden.element_size() if store_w else 0)
    # Each vocabulary column of a block written in one piece may need float32 scratch for the
    # half-precision weight gradients (one buffer, used by one model after the other).
    scratch_dim = max([w.shape[1] for w, request in ((strong_weight, strong_request),
                                                     (weak_weight, weak_request))
                       if _ModelOutputs.needs_scratch(request, w, True)], default=0)
    if blocks is None:
        budget = gradient_buffer_budget(
            _gradient_bytes(strong_request, strong_hidden, strong_weight)
            + _gradient_bytes(weak_request, weak_hidden, weak_weight))
        blocks = plan_grad_blocks(num_tokens, vocab, bytes_per_entry, budget, tiles,
                                  bytes_per_column=4 * scratch_dim)
    chunk, block = min(blocks.token_chunk, max(num_tokens, 1)), min(blocks.vocab_block, vocab)
    if num_tokens == 0 or not (strong_request.any or weak_request.any):
        return _zero_grads(strong_request, strong_hidden, strong_weight), _zero_grads(
            weak_request, weak_hidden, weak_weight)
    single_chunk = chunk >= num_tokens
    scale, coefficients = _factor_coefficients(coefficients)
    scratch = None
    if single_chunk and scratch_dim:
        scratch = torch.empty(block * scratch_dim, device=strong_hidden.device,
                              dtype=torch.float32)
    out_s = _ModelOutputs(strong_request, strong_hidden, strong_weight, chunk, single_chunk,
                          scale, scratch)
    out_w = _ModelOutputs(weak_request, weak_hidden, weak_weight, chunk, single_chunk, scale,
                          scratch)

    block_grads = _BlockGrads(
        source, tiles, chunk, block, strong, weak, labels, lse, coefficients, lam=lam,
        softcap=softcap, store_s=store_s, store_w=store_w, shared=shared,
        one_gradient=one_gradient)
    for t0 in range(0, num_tokens, chunk):
        tokens = slice(t0, min(t0 + chunk, num_tokens))
        hs, hw = strong_hidden[tokens], weak_hidden[tokens]
        acc_s, acc_w = out_s.start_chunk(tokens), out_w.start_chunk(tokens)
        for v0 in range(0, vocab, block):
            columns = slice(v0, min(v0 + block, vocab))
            ws, ww = strong_weight[columns], weak_weight[columns]
            gs, gw = block_grads(tokens, columns)
            if strong_request.any:
                out_s.add_block(acc_s, gs, alpha_s, hs, ws, columns)
            if weak_request.any:
                out_w.add_block(acc_w, gw, alpha_w, hw, ww, columns)
        out_s.finish_chunk(tokens, acc_s)
        out_w.finish_chunk(tokens, acc_w)
    return out_s.grads(), out_w.grads()
