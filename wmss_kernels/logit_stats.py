"""Per-token logit statistics of one model (``wmss.logit_stats``), no logits in memory.

For each token ``n`` with logits ``z = softcap(h W^T + b)`` over ``V`` columns and label ``y``
(the fields of ``wmss.loss.engines.contract.LogitTokenStats``)::

    target_logit = z[y]                     logprob = z[y] - lse(z)      entropy of softmax(z)
    mean_logit   = sum_v z_v / V            mean_nontarget_logit = sum_{v != y} z_v / (V - 1)
    max_nontarget_logit = max_{v != y} z_v  margin = z[y] - max_nontarget_logit
    rank = #{v != y : z_v > z[y]}

Three launches:

1. ``_target_logit_kernel``: ``z[y]`` per token, as the dot product of the hidden state with its
   label's weight row (float32 products and sums; bias and soft-cap as for every logit). It is
   needed before the vocabulary pass, which counts the logits above it.
2. ``_logit_partials_kernel``, one program per (token tile, vocabulary split), in the L2-friendly
   order of ``logit_tiles.grouped_tile``: logit tiles from ``tl.dot`` folded into the online
   ``(m, s, t)`` of the entropy and the log-sum-exp, and into the non-target sum, maximum and
   count above ``z[y]``, with exactly the label's column left out (not subtracted afterwards:
   ``sum - z[y]`` would cancel when ``z[y]`` dominates the row).
3. ``_logit_combine_kernel``: merges the splits' partials in a fixed order (deterministic, no
   atomics), as ``fused_stats`` does, and writes the outputs.

Positions whose label is ``ignore_index`` get 0 in every field. ``HAS_LABELS=False``: every
position is scored and none has a target (the contract's meaning of labels None). Tiles are the
forward statistics' (``config.stats_tiles``; float32 with at most ``FP32_MAX_BLOCK_N`` tokens
and hidden slices of at most ``FP32_MAX_BLOCK_D``); the ``"cublas"`` logit source is not used
here (the kernels always compute their tiles).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from wmss.loss.engines.contract import LogitTokenStats, ModelInputs

from . import config
from .fused_stats import _choose_splits
from .logit_tiles import grouped_tile, logits_tile, merge_stats, online_update, soft_cap

_MASKED = tl.constexpr(config.MASKED_LOGIT)

# Rows of the partials buffer [NUM_PARTIALS, splits, tokens], float32: the online (m, s, t), the
# non-target sum and maximum, and the count of non-target logits above the target (a whole
# number, exact in float32 for any vocabulary below 2^24).
_P_M, _P_S, _P_T, _P_SUM, _P_MAX, _P_ABOVE = (tl.constexpr(row) for row in range(6))
NUM_PARTIALS = 6
# Floating outputs [NUM_FLOAT_OUTPUTS, tokens], in the order of LogitTokenStats without ``rank``.
NUM_FLOAT_OUTPUTS = 7
# Token rows and hidden-dimension slice of the target-logit kernel (elementwise products, no
# tl.dot; it reads each hidden row once), whatever the statistics kernels' tiles. ptxas spills
# 16-24 B in some variants of this small kernel at 64x64 (triton 3.6, sm_80), 64x32 and 32x64
# (triton 3.9, sm_90); 32x32 and 16x64 build every variant without a spill under both.
TARGET_BLOCK_N = 32
TARGET_BLOCK_D = 32
# With float32 operands (held in registers by IEEE/TF32 dots) the non-target statistics leave
# too few registers for config's float32 stats tiles: 32-wide hidden slices spill 12-20 B on sm_80
# (the labelled variants, compile gate, triton 3.9), and 64x64x16 at 8 warps still spills 12-28 B
# in 3 (sm_90) and 8 (sm_80) of the 16 variants under triton 3.6, the GPU image's. Float32 tiles
# take at most these: 32x64x16 at 8 warps builds every variant without a spill on sm_80 and sm_90
# under triton 3.6 and 3.9 (103-106 registers; 64x32x16 does too).
FP32_MAX_BLOCK_N = 32
FP32_MAX_BLOCK_D = 16


@triton.jit
def _has_target(labels_ptr, offs_n, mask_n, ignore_index, HAS_LABELS: tl.constexpr):
    """``(y, has_target)`` of a token tile; ``y`` is -1 (no column) where there is no target.

    ``y`` is int32 (a label is below V < 2^31): comparing int64 labels with every column of a
    tile costs twice the registers, and spills in the float32 kernels.
    """
    if HAS_LABELS:
        y = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
        has_target = mask_n & (y != ignore_index)
        y = tl.where(has_target, y, -1).to(tl.int32)
    else:
        y = tl.full(offs_n.shape, -1, tl.int32)
        has_target = offs_n < 0
    return y, has_target


@triton.jit
def _target_logit_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, zt_ptr, num_tokens, dim, stride_h, stride_w, ignore_index,
    softcap,
    HAS_LABELS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    y, has_target = _has_target(labels_ptr, offs_n, mask_n, ignore_index, HAS_LABELS)
    rows = tl.where(has_target, y, 0).to(tl.int64)
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + rows[:, None] * stride_w
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = has_target[:, None] & (offs_d < dim)[None, :]
        h = tl.load(h_rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(h * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=has_target, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        acc = soft_cap(acc, softcap)
    tl.store(zt_ptr + offs_n, tl.where(has_target, acc, 0.0), mask=mask_n)


@triton.jit
def _logit_partials_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, zt_ptr, part_ptr, num_tokens, vocab, dim, stride_h,
    stride_w, vocab_per_split, num_splits, group_size, ignore_index, softcap,
    HAS_LABELS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, split = grouped_tile(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_N), num_splits,
                                group_size)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    y, _ = _has_target(labels_ptr, offs_n, mask_n, ignore_index, HAS_LABELS)
    z_target = tl.load(zt_ptr + offs_n, mask=mask_n, other=0.0)

    m = tl.full((BLOCK_N,), _MASKED, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    nontarget_sum = tl.zeros((BLOCK_N,), tl.float32)
    nontarget_max = tl.full((BLOCK_N,), _MASKED, tl.float32)
    above = tl.zeros((BLOCK_N,), tl.float32)

    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, vocab)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid_v = (offs_v < v_end)[None, :]
        z = logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, num_tokens, vocab, dim, stride_h,
                        stride_w, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_D)
        z = tl.where(valid_v, z, _MASKED)
        m, s, t = online_update(m, s, t, z)
        # Masked columns hold MASKED_LOGIT already: below every target, and 0 in the sum.
        z_nontarget = tl.where(offs_v[None, :] == y[:, None], _MASKED, z)
        nontarget_max = tl.maximum(nontarget_max, tl.max(z_nontarget, axis=1))
        above += tl.sum((z_nontarget > z_target[:, None]).to(tl.float32), axis=1)
        nontarget_sum += tl.sum(tl.where(z_nontarget > _MASKED, z_nontarget, 0.0), axis=1)

    row = num_splits * num_tokens
    out = part_ptr + split * num_tokens + offs_n
    tl.store(out + _P_M * row, m, mask=mask_n)
    tl.store(out + _P_S * row, s, mask=mask_n)
    tl.store(out + _P_T * row, t, mask=mask_n)
    tl.store(out + _P_SUM * row, nontarget_sum, mask=mask_n)
    tl.store(out + _P_MAX * row, nontarget_max, mask=mask_n)
    tl.store(out + _P_ABOVE * row, above, mask=mask_n)


@triton.jit
def _logit_combine_kernel(
    part_ptr, labels_ptr, zt_ptr, out_ptr, rank_ptr, num_tokens, num_splits, vocab, ignore_index,
    HAS_LABELS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_tokens
    _, has_target = _has_target(labels_ptr, offs_n, mask_n, ignore_index, HAS_LABELS)
    # Labelled: the positions not ignored (each has a target). No labels: every position.
    if HAS_LABELS:
        scored = has_target
    else:
        scored = mask_n
    z_target = tl.load(zt_ptr + offs_n, mask=mask_n, other=0.0)

    row = num_splits * num_tokens
    base = part_ptr + offs_n
    m = tl.load(base + _P_M * row, mask=mask_n, other=0.0)
    s = tl.load(base + _P_S * row, mask=mask_n, other=1.0)
    t = tl.load(base + _P_T * row, mask=mask_n, other=0.0)
    nontarget_sum = tl.load(base + _P_SUM * row, mask=mask_n, other=0.0)
    nontarget_max = tl.load(base + _P_MAX * row, mask=mask_n, other=0.0)
    above = tl.load(base + _P_ABOVE * row, mask=mask_n, other=0.0)
    for k in range(1, num_splits):
        p = base + k * num_tokens
        m, s, t = merge_stats(m, s, t, tl.load(p + _P_M * row, mask=mask_n, other=0.0),
                              tl.load(p + _P_S * row, mask=mask_n, other=1.0),
                              tl.load(p + _P_T * row, mask=mask_n, other=0.0))
        nontarget_sum += tl.load(p + _P_SUM * row, mask=mask_n, other=0.0)
        nontarget_max = tl.maximum(nontarget_max,
                                   tl.load(p + _P_MAX * row, mask=mask_n, other=0.0))
        above += tl.load(p + _P_ABOVE * row, mask=mask_n, other=0.0)

    log_s = tl.log(s)
    nontarget_count = vocab - tl.where(has_target, 1, 0)
    has_nontarget = scored & (nontarget_count > 0)
    both = has_target & has_nontarget
    row_out = num_tokens
    out = out_ptr + offs_n
    tl.store(out + 0 * row_out, tl.where(has_target, z_target, 0.0), mask=mask_n)
    tl.store(out + 1 * row_out, tl.where(scored, (nontarget_sum + z_target) / vocab, 0.0),
             mask=mask_n)
    tl.store(out + 2 * row_out,
             tl.where(has_nontarget, nontarget_sum / tl.maximum(nontarget_count, 1), 0.0),
             mask=mask_n)
    tl.store(out + 3 * row_out, tl.where(has_nontarget, nontarget_max, 0.0), mask=mask_n)
    tl.store(out + 4 * row_out, tl.where(both, z_target - nontarget_max, 0.0), mask=mask_n)
    tl.store(out + 5 * row_out, tl.where(scored, log_s - t / s, 0.0), mask=mask_n)
    # z[y] - m is exact near the max: keep it apart from log s (as fused_stats does).
    tl.store(out + 6 * row_out, tl.where(has_target, (z_target - m) - log_s, 0.0), mask=mask_n)
    tl.store(rank_ptr + offs_n, tl.where(both, above, 0.0).to(tl.int64), mask=mask_n)


def logit_token_stats(
    model: ModelInputs, labels: Optional[torch.Tensor], *, softcap: Optional[float],
    ignore_index: int, tiles: Optional[config.Tiles] = None, num_splits: Optional[int] = None,
) -> LogitTokenStats:
    """``LogitTokenStats`` of one model without materialising its logits.

    Args:
        model: hidden ``[N, d]`` and weight ``[V, d]`` with unit column stride, bf16, fp16 or
            fp32 (one dtype), bias ``[V]`` or None.
        labels: ``[N]`` int64, each in ``[0, V)`` or equal to ``ignore_index`` (not checked
            here), or None: every position scored, no targets.
        tiles, num_splits: launch overrides (tests, tuning); defaults from ``config``.

    Returns:
        ``LogitTokenStats`` of float32 ``[N]`` tensors, ``rank`` int64.
    """
    hidden, weight, bias = model
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    out = torch.zeros((NUM_FLOAT_OUTPUTS, num_tokens), device=device, dtype=torch.float32)
    rank = torch.zeros(num_tokens, device=device, dtype=torch.int64)
    if num_tokens == 0:
        return _result(out, rank)
    if tiles is None:
        tiles = config.stats_tiles(hidden.dtype, config.device_arch(device))
        if hidden.dtype == torch.float32:
            tiles = dataclasses.replace(tiles, block_n=min(tiles.block_n, FP32_MAX_BLOCK_N),
                                        block_d=min(tiles.block_d, FP32_MAX_BLOCK_D))
    has_labels = labels is not None
    labels_arg = labels if has_labels else rank  # never read without labels
    bias_arg = bias if bias is not None else weight  # never read without a bias
    cap = float(softcap or 1.0)
    z_target = torch.empty(num_tokens, device=device, dtype=torch.float32)
    _target_logit_kernel[(triton.cdiv(num_tokens, TARGET_BLOCK_N),)](
        hidden, weight, bias_arg, labels_arg, z_target, num_tokens, dim, hidden.stride(0),
        weight.stride(0), ignore_index, cap,
        HAS_LABELS=has_labels, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_N=TARGET_BLOCK_N, BLOCK_D=TARGET_BLOCK_D,
    )
    token_tiles = triton.cdiv(num_tokens, tiles.block_n)
    group_size = min(config.token_tiles_per_group(tiles.block_n, dim * hidden.element_size()),
                     token_tiles)  # no larger than the grid (int32 program ids)
    splits, vocab_per_split = _choose_splits(num_tokens, vocab, tiles, device, num_splits,
                                             group_size)
    partials = torch.empty((NUM_PARTIALS, splits, num_tokens), device=device,
                           dtype=torch.float32)
    _logit_partials_kernel[(token_tiles * splits,)](
        hidden, weight, bias_arg, labels_arg, z_target, partials, num_tokens, vocab, dim,
        hidden.stride(0), weight.stride(0), vocab_per_split, splits, group_size, ignore_index,
        cap,
        HAS_LABELS=has_labels, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST_DOT=config.upcast_dot_operands(), DOT_PRECISION=config.dot_precision(),
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    _logit_combine_kernel[(triton.cdiv(num_tokens, config.COMBINE_BLOCK_N),)](
        partials, labels_arg, z_target, out, rank, num_tokens, splits, vocab, ignore_index,
        HAS_LABELS=has_labels, BLOCK_N=config.COMBINE_BLOCK_N,
    )
    return _result(out, rank)


def _result(out: torch.Tensor, rank: torch.Tensor) -> LogitTokenStats:
    target, mean, mean_nt, max_nt, margin, entropy, logprob = out.unbind(0)
    return LogitTokenStats(target, mean, mean_nt, max_nt, margin, rank, entropy, logprob)
