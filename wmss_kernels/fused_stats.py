"""Forward of the mixed-logit loss: every per-token statistic in one pass, no logits in memory.

For each token ``n`` (docs/design.md sections 1.1 and 2.1), with
``z_s = softcap(h_s W_s^T + b_s)`` and ``z_w`` alike::

    z_m    = lam * z_s + (1 - lam) * z_w
    loss   = lse(z_m) - z_m[y]   (mixed tokens)
           = lse(z_s) - z_s[y]   (supervised tokens that gap masking sends to plain CE)
    H_s    = lse(z_s) - sum softmax(z_s) z_s,   H_w alike
    logp_* = z_*[y] - lse(z_*)
    mixed  = supervised and (gap_threshold is None or H_w - H_s >= gap_threshold)

Two launches:

1. ``_stats_partials_kernel``, one program per (token tile, vocabulary split): each walks one
   token tile across one slice of the vocabulary, computing logit tiles on the tensor cores and
   folding them into online statistics (``logit_tiles.online_update``). Programs run in groups
   of token tiles that stay in L2 (``logit_tiles.grouped_tile``), with enough splits that one
   group fills the GPU; splitting the vocabulary also keeps every SM busy when tokens are few.
2. ``_stats_combine_kernel``: merges the splits' partials in a fixed order (deterministic, no
   atomics) and writes the per-token outputs.

The same kernels serve one model alone (``TWO_MODELS=False``) for ``token_entropy``.

With the ``"cublas"`` logit source (``config.LOGIT_SOURCE``), step 1 is replaced by cuBLAS writing
float32 logit blocks ``[N, block]`` and ``_block_stats_kernel`` folding each block into the
statistics (one split, merged block after block, in order); step 2 is the same.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from wmss.loss.engines.contract import MixedLossSpec, MixedTokenStats, ModelInputs, SingleTokenStats

from . import config
from .logit_tiles import (
    fold_model,
    grouped_tile,
    loaded_logits_tile,
    logits_tile,
    merge_stats,
    online_update_lse,
)
from .products import write_product

_MASKED = tl.constexpr(config.MASKED_LOGIT)

# Rows of the partials buffer [NUM_PARTIALS, splits, tokens]: per model (m, s, t, target logit),
# then the mixture's (m, s).
_P_STRONG, _P_WEAK, _P_MIX = 0, 4, 8
NUM_PARTIALS_TWO_MODELS = 10
NUM_PARTIALS_ONE_MODEL = 4

# Per-token float32 outputs, in the order of MixedTokenStats (all but ``mixed``).
NUM_OUTPUTS = 10


@triton.jit
def _empty_stats(BLOCK_N: tl.constexpr):
    """The running statistics of no logits at all: ``(m, s, t, z[y])`` for each model, ``(m, s)``
    for the mixture (``m`` at ``MASKED_LOGIT``, so the first real tile takes over)."""
    m = tl.full((BLOCK_N,), _MASKED, tl.float32)
    zero = tl.zeros((BLOCK_N,), tl.float32)
    return m, zero, zero, zero, m, zero, zero, zero, m, zero


@triton.jit
def _stats_partials_kernel(
    hs_ptr, ws_ptr, bs_ptr, hw_ptr, ww_ptr, bw_ptr, labels_ptr, part_ptr,
    num_tokens, vocab, dim_s, dim_w, stride_hs, stride_ws, stride_hw, stride_ww,
    vocab_per_split, num_splits, group_size, lam, softcap,
    TWO_MODELS: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_W: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, split = grouped_tile(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_N), num_splits,
                                group_size)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    # Ignored positions carry labels outside [0, vocab): they match no column.
    y = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)

    m_s, s_s, t_s, zy_s, m_w, s_w, t_w, zy_w, m_m, s_m = _empty_stats(BLOCK_N)

    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, vocab)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid_v = (offs_v < v_end)[None, :]
        is_target = (offs_v[None, :] == y[:, None]) & valid_v
        # One tile at a time where possible (registers): the strong tile is folded, and only
        # its share of the mixture kept, before the weak tile is computed.
        z_s = logits_tile(hs_ptr, ws_ptr, bs_ptr, offs_n, offs_v, num_tokens, vocab, dim_s,
                          stride_hs, stride_ws, softcap, HAS_BIAS_S, HAS_SOFTCAP, UPCAST_DOT,
                          DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        z_s = tl.where(valid_v, z_s, _MASKED)
        m_s, s_s, t_s, zy_s = fold_model(m_s, s_s, t_s, zy_s, z_s, is_target)
        if TWO_MODELS:
            strong_part = lam * z_s
            z_w = logits_tile(hw_ptr, ww_ptr, bw_ptr, offs_n, offs_v, num_tokens, vocab, dim_w,
                              stride_hw, stride_ww, softcap, HAS_BIAS_W, HAS_SOFTCAP, UPCAST_DOT,
                              DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
            z_w = tl.where(valid_v, z_w, _MASKED)
            m_w, s_w, t_w, zy_w = fold_model(m_w, s_w, t_w, zy_w, z_w, is_target)
            m_m, s_m = online_update_lse(m_m, s_m, strong_part + (1.0 - lam) * z_w)

    _store_partials(part_ptr + split * num_tokens + offs_n, num_splits * num_tokens, mask_n,
                    m_s, s_s, t_s, zy_s, m_w, s_w, t_w, zy_w, m_m, s_m, TWO_MODELS)


@triton.jit
def _store_partials(out, row, mask_n, m_s, s_s, t_s, zy_s, m_w, s_w, t_w, zy_w, m_m, s_m,
                    TWO_MODELS: tl.constexpr):
    """Store one split's statistics at ``out`` (partial rows ``row`` apart, layout above)."""
    tl.store(out + 0 * row, m_s, mask=mask_n)
    tl.store(out + 1 * row, s_s, mask=mask_n)
    tl.store(out + 2 * row, t_s, mask=mask_n)
    tl.store(out + 3 * row, zy_s, mask=mask_n)
    if TWO_MODELS:
        tl.store(out + 4 * row, m_w, mask=mask_n)
        tl.store(out + 5 * row, s_w, mask=mask_n)
        tl.store(out + 6 * row, t_w, mask=mask_n)
        tl.store(out + 7 * row, zy_w, mask=mask_n)
        tl.store(out + 8 * row, m_m, mask=mask_n)
        tl.store(out + 9 * row, s_m, mask=mask_n)


@triton.jit
def _merge_stored(out, row, mask_n, m, s, t, zy):
    """Merge the running ``(m, s, t, z[y])`` with the one stored at ``out`` (rows ``row`` apart)."""
    m, s, t = merge_stats(tl.load(out, mask=mask_n, other=0.0),
                          tl.load(out + row, mask=mask_n, other=1.0),
                          tl.load(out + 2 * row, mask=mask_n, other=0.0), m, s, t)
    return m, s, t, zy + tl.load(out + 3 * row, mask=mask_n, other=0.0)


@triton.jit
def _block_stats_kernel(
    zs_ptr, zw_ptr, bs_ptr, bw_ptr, labels_ptr, part_ptr, num_tokens, width, vocab_start,
    stride_z, lam, softcap,
    TWO_MODELS: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_W: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, MERGE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``_stats_partials_kernel`` over one vocabulary block of raw logits that cuBLAS wrote to
    memory (``[num_tokens, width]`` float32, columns ``vocab_start + c``), merged into the single
    split of ``part_ptr`` when ``MERGE`` (every block after the first)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    y = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1) - vocab_start

    m_s, s_s, t_s, zy_s, m_w, s_w, t_w, zy_w, m_m, s_m = _empty_stats(BLOCK_N)
    for c0 in range(0, width, BLOCK_V):
        offs_v = c0 + tl.arange(0, BLOCK_V)
        valid_v = (offs_v < width)[None, :]
        is_target = (offs_v[None, :] == y[:, None]) & valid_v
        z_s = loaded_logits_tile(zs_ptr, bs_ptr, offs_n, offs_v, num_tokens, width, stride_z,
                                 softcap, HAS_BIAS_S, HAS_SOFTCAP)
        z_s = tl.where(valid_v, z_s, _MASKED)
        m_s, s_s, t_s, zy_s = fold_model(m_s, s_s, t_s, zy_s, z_s, is_target)
        if TWO_MODELS:
            z_w = loaded_logits_tile(zw_ptr, bw_ptr, offs_n, offs_v, num_tokens, width,
                                     stride_z, softcap, HAS_BIAS_W, HAS_SOFTCAP)
            z_w = tl.where(valid_v, z_w, _MASKED)
            m_w, s_w, t_w, zy_w = fold_model(m_w, s_w, t_w, zy_w, z_w, is_target)
            m_m, s_m = online_update_lse(m_m, s_m, lam * z_s + (1.0 - lam) * z_w)

    out = part_ptr + offs_n
    if MERGE:  # each program owns its token rows: this read-modify-write has no race
        m_s, s_s, t_s, zy_s = _merge_stored(out, num_tokens, mask_n, m_s, s_s, t_s, zy_s)
        if TWO_MODELS:
            m_w, s_w, t_w, zy_w = _merge_stored(out + 4 * num_tokens, num_tokens, mask_n, m_w,
                                                s_w, t_w, zy_w)
            zero = tl.zeros((BLOCK_N,), tl.float32)
            m_m, s_m, _ = merge_stats(tl.load(out + 8 * num_tokens, mask=mask_n, other=0.0),
                                      tl.load(out + 9 * num_tokens, mask=mask_n, other=1.0),
                                      zero, m_m, s_m, zero)
    _store_partials(out, num_tokens, mask_n, m_s, s_s, t_s, zy_s, m_w, s_w, t_w, zy_w, m_m, s_m,
                    TWO_MODELS)


@triton.jit
def _merge_model(part_ptr, first_row, offs_n, mask_n, num_tokens, num_splits):
    """Merge one model's (m, s, t, target logit) partials over the splits, in split order.

    Returns ``(m, log s, entropy, z[y])``; the log-sum-exp is ``m + log s``, kept apart (see
    ``results.MixedTokenStats``).
    """
    row = num_splits * num_tokens
    base = part_ptr + first_row * row + offs_n
    m = tl.load(base, mask=mask_n, other=0.0)
    s = tl.load(base + row, mask=mask_n, other=1.0)
    t = tl.load(base + 2 * row, mask=mask_n, other=0.0)
    zy = tl.load(base + 3 * row, mask=mask_n, other=0.0)
    for k in range(1, num_splits):
        p = base + k * num_tokens
        m, s, t = merge_stats(m, s, t, tl.load(p, mask=mask_n, other=0.0),
                              tl.load(p + row, mask=mask_n, other=1.0),
                              tl.load(p + 2 * row, mask=mask_n, other=0.0))
        zy += tl.load(p + 3 * row, mask=mask_n, other=0.0)
    log_s = tl.log(s)
    return m, log_s, log_s - t / s, zy


@triton.jit
def _stats_combine_kernel(
    part_ptr, labels_ptr, loss_ptr, max_s_ptr, logsum_s_ptr, max_m_ptr, logsum_m_ptr, h_s_ptr,
    h_w_ptr, logp_s_ptr, logp_w_ptr, logp_m_ptr, mixed_ptr, num_tokens, num_splits, lam,
    gap_threshold, ignore_index,
    TWO_MODELS: tl.constexpr, HAS_GAP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    y = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    supervised = y != ignore_index

    m_s, log_s_s, h_s, zy_s = _merge_model(part_ptr, 0, offs_n, mask_n, num_tokens, num_splits)
    logp_s = (zy_s - m_s) - log_s_s  # z[y] - m is exact near the max: keep it apart from log s
    tl.store(max_s_ptr + offs_n, m_s, mask=mask_n)
    tl.store(logsum_s_ptr + offs_n, log_s_s, mask=mask_n)
    tl.store(h_s_ptr + offs_n, tl.where(supervised, h_s, 0.0), mask=mask_n)
    tl.store(logp_s_ptr + offs_n, tl.where(supervised, logp_s, 0.0), mask=mask_n)
    if TWO_MODELS:
        m_w, log_s_w, h_w, zy_w = _merge_model(part_ptr, 4, offs_n, mask_n, num_tokens,
                                               num_splits)
        # The mixture's (m, s): merged like the others with t = 0 (its entropy is not needed).
        row = num_splits * num_tokens
        base = part_ptr + 8 * row + offs_n
        m_m = tl.load(base, mask=mask_n, other=0.0)
        s_m = tl.load(base + row, mask=mask_n, other=1.0)
        zero = tl.zeros((BLOCK_N,), tl.float32)
        for k in range(1, num_splits):
            p = base + k * num_tokens
            m_m, s_m, _ = merge_stats(m_m, s_m, zero, tl.load(p, mask=mask_n, other=0.0),
                                      tl.load(p + row, mask=mask_n, other=1.0), zero)
        log_s_m = tl.log(s_m)
        logp_m = ((lam * zy_s + (1.0 - lam) * zy_w) - m_m) - log_s_m
        mixed = supervised
        if HAS_GAP:
            mixed = mixed & (h_w - h_s >= gap_threshold)
        loss = tl.where(mixed, -logp_m, tl.where(supervised, -logp_s, 0.0))
        tl.store(loss_ptr + offs_n, loss, mask=mask_n)
        tl.store(max_m_ptr + offs_n, m_m, mask=mask_n)
        tl.store(logsum_m_ptr + offs_n, log_s_m, mask=mask_n)
        tl.store(h_w_ptr + offs_n, tl.where(supervised, h_w, 0.0), mask=mask_n)
        tl.store(logp_w_ptr + offs_n, tl.where(supervised, (zy_w - m_w) - log_s_w, 0.0),
                 mask=mask_n)
        tl.store(logp_m_ptr + offs_n, tl.where(supervised, logp_m, 0.0), mask=mask_n)
        tl.store(mixed_ptr + offs_n, mixed.to(tl.int8), mask=mask_n)


def _choose_splits(num_tokens: int, vocab: int, tiles: config.Tiles, device: torch.device,
                   num_splits: Optional[int], group_size: int) -> tuple[int, int]:
    """(splits, vocabulary entries per split); every split is non-empty and tile-aligned.

    Programs run a group of token tiles at a time (``grouped_tile``): enough splits that one
    group fills the GPU (``STATS_PROGRAMS_PER_SM`` programs per SM), so a group's hidden states
    are all the hidden states in flight. Few tokens: one group holding them all, more splits.
    """
    token_tiles = triton.cdiv(num_tokens, tiles.block_n)
    vocab_tiles = triton.cdiv(vocab, tiles.block_v)
    if num_splits is None:
        target = config.STATS_PROGRAMS_PER_SM * config.multiprocessor_count(device)
        live_token_tiles = min(token_tiles, group_size)
        num_splits = min(triton.cdiv(target, live_token_tiles), config.MAX_VOCAB_SPLITS)
        # Partials [NUM_PARTIALS, splits, N] float32: within their budget, and indexable in int32.
        per_split = NUM_PARTIALS_TWO_MODELS * max(num_tokens, 1)
        num_splits = min(num_splits, config.MAX_PARTIALS_BYTES // (4 * per_split),
                         (2**31 - 1) // per_split)
    num_splits = max(1, min(num_splits, vocab_tiles))
    tiles_per_split = triton.cdiv(vocab_tiles, num_splits)
    return triton.cdiv(vocab_tiles, tiles_per_split), tiles_per_split * tiles.block_v


def _block_width(num_tokens: int, vocab: int, bytes_per_entry: int, budget: int,
                 tiles: config.Tiles) -> int:
    """Vocabulary entries per logit block: what ``budget`` allows, tile-aligned, at least a tile."""
    width = budget // (max(num_tokens, 1) * bytes_per_entry) // tiles.block_v * tiles.block_v
    return min(vocab, max(width, tiles.block_v))


def _partials_from_cublas(strong: ModelInputs, weak: ModelInputs, labels, partials, *,
                          two_models, lam, softcap, tiles: config.Tiles):
    """Fill the single split of ``partials`` from float32 logit blocks written by cuBLAS
    (``weak`` is ``strong`` again for one model)."""
    (hs, ws, bs), (hw, ww, bw) = strong, weak
    num_tokens, vocab = hs.shape[0], ws.shape[0]
    models = 2 if two_models else 1
    width = _block_width(num_tokens, vocab, 4 * models, config.STATS_LOGIT_BYTES, tiles)
    flat_s = torch.empty(num_tokens * width, device=hs.device, dtype=torch.float32)
    flat_w = torch.empty_like(flat_s) if two_models else flat_s
    grid = (triton.cdiv(num_tokens, tiles.block_n),)
    for v0 in range(0, vocab, width):
        columns = slice(v0, min(v0 + width, vocab))
        cols = columns.stop - columns.start
        z_s = flat_s[:num_tokens * cols].view(num_tokens, cols)
        z_w = flat_w[:num_tokens * cols].view(num_tokens, cols)
        write_product(z_s, hs, ws[columns].t())
        if two_models:
            write_product(z_w, hw, ww[columns].t())
        _block_stats_kernel[grid](
            z_s, z_w, bs[columns] if bs is not None else z_s,
            bw[columns] if bw is not None else z_s, labels, partials, num_tokens, cols, v0,
            cols, float(lam), float(softcap or 1.0), TWO_MODELS=two_models,
            HAS_BIAS_S=bs is not None, HAS_BIAS_W=bw is not None, HAS_SOFTCAP=softcap is not None,
            MERGE=v0 > 0, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )


def _launch(strong, weak, labels, *, lam, softcap, gap_threshold, ignore_index, tiles, num_splits,
            logit_source):
    hs, ws, bs = strong
    num_tokens, vocab = hs.shape[0], ws.shape[0]
    two_models = weak is not None
    hw, ww, bw = weak if two_models else (hs, ws, None)
    device = hs.device
    source = config.logit_source(logit_source)
    out = torch.zeros((NUM_OUTPUTS, num_tokens), device=device, dtype=torch.float32)
    mixed = torch.zeros(num_tokens, device=device, dtype=torch.int8)
    if num_tokens == 0:
        return out, mixed.view(torch.bool)
    if tiles is None:
        tiles = config.stats_tiles(hs.dtype, config.device_arch(device))
    group_size = min(config.token_tiles_per_group(
        tiles.block_n, hs.shape[1] * hs.element_size() + (hw.shape[1] * hw.element_size()
                                                          if two_models else 0)),
        triton.cdiv(num_tokens, tiles.block_n))  # no larger than the grid (int32 program ids)
    if source == "cublas":
        splits = 1
    else:
        splits, vocab_per_split = _choose_splits(num_tokens, vocab, tiles, device, num_splits,
                                                 group_size)
    num_partials = NUM_PARTIALS_TWO_MODELS if two_models else NUM_PARTIALS_ONE_MODEL
    partials = torch.empty((num_partials, splits, num_tokens), device=device, dtype=torch.float32)

    if source == "cublas":
        _partials_from_cublas(ModelInputs(hs, ws, bs), ModelInputs(hw, ww, bw), labels, partials,
                              two_models=two_models, lam=lam, softcap=softcap,
                              tiles=config.loaded_tiles(config.device_arch(device)))
    else:
        grid = (triton.cdiv(num_tokens, tiles.block_n) * splits,)
        _stats_partials_kernel[grid](
            hs, ws, bs if bs is not None else ws, hw, ww, bw if bw is not None else ww, labels,
            partials, num_tokens, vocab, hs.shape[1], hw.shape[1], hs.stride(0), ws.stride(0),
            hw.stride(0), ww.stride(0), vocab_per_split, splits, group_size, float(lam),
            float(softcap or 1.0),
            TWO_MODELS=two_models, HAS_BIAS_S=bs is not None, HAS_BIAS_W=bw is not None,
            HAS_SOFTCAP=softcap is not None, UPCAST_DOT=config.upcast_dot_operands(),
            DOT_PRECISION=config.dot_precision(), BLOCK_N=tiles.block_n,
            BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
    combine_grid = (triton.cdiv(num_tokens, config.COMBINE_BLOCK_N),)
    _stats_combine_kernel[combine_grid](
        partials, labels, *out.unbind(0), mixed, num_tokens, splits, float(lam),
        float(gap_threshold if gap_threshold is not None else 0.0), ignore_index,
        TWO_MODELS=two_models, HAS_GAP=gap_threshold is not None, BLOCK_N=config.COMBINE_BLOCK_N,
    )
    return out, mixed.view(torch.bool)


def mixed_token_stats(
    strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor, spec: MixedLossSpec, *,
    tiles: Optional[config.Tiles] = None, num_splits: Optional[int] = None,
    logit_source: Optional[str] = None,
) -> MixedTokenStats:
    """Per-token loss and statistics of the mixed-logit cross-entropy, without materialising logits.

    Args:
        strong: the strong model's ``ModelInputs``: hidden ``[N, d_s]`` and weight ``[V, d_s]``
            with unit column stride, bf16, fp16 or fp32 (one dtype), bias ``[V]`` or None.
        weak: the weak model's, ``[N, d_w]``, ``[V, d_w]``, ``[V]``.
        labels: ``[N]`` int64, each in ``[0, V)`` or equal to ``spec.ignore_index`` (not checked
            here).
        spec: lam, softcap, gap threshold and ignore index.
        tiles, num_splits, logit_source: launch overrides (tests, tuning); defaults from
            ``config`` (``num_splits`` and ``tiles`` apply to the ``"triton"`` logit source).

    Returns:
        ``MixedTokenStats`` of float32 ``[N]`` tensors (``mixed`` is bool).
    """
    out, mixed = _launch(strong, weak, labels, lam=spec.lam, softcap=spec.softcap,
                         gap_threshold=spec.gap_threshold, ignore_index=spec.ignore_index,
                         tiles=tiles, num_splits=num_splits, logit_source=logit_source)
    return MixedTokenStats(*out.unbind(0), mixed)


def single_token_stats(
    model: ModelInputs, labels: torch.Tensor, *, softcap: Optional[float], ignore_index: int,
    tiles: Optional[config.Tiles] = None, num_splits: Optional[int] = None,
    logit_source: Optional[str] = None,
) -> SingleTokenStats:
    """Per-token entropy, log-sum-exp and target log-prob of one model's next-token distribution.

    Shapes and dtypes as in ``mixed_token_stats`` for one model. Positions whose label equals
    ``ignore_index`` get entropy and log-prob 0 (pass labels all different from ``ignore_index``
    to score every position).
    """
    out, _ = _launch(model, None, labels, lam=1.0, softcap=softcap,
                     gap_threshold=None, ignore_index=ignore_index, tiles=tiles,
                     num_splits=num_splits, logit_source=logit_source)
    fields = MixedTokenStats(*out.unbind(0), mixed=None)
    return SingleTokenStats(fields.entropy_strong, fields.max_strong + fields.logsum_strong,
                            fields.logprob_strong)
