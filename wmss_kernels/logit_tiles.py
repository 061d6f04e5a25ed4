"""Building blocks shared by the forward and backward kernels.

* ``logits_tile``: one ``[BLOCK_N, BLOCK_V]`` tile of ``h @ W^T (+ b)``, optionally soft-capped,
  accumulated in float32 on the tensor cores; the full logits never exist in memory.
  ``mixed_logits_tile``: the mixture's tile in a single accumulator.
* ``grouped_tile``: the L2-friendly order in which programs visit (token, vocabulary) tiles.
* ``loaded_logits_tile``: the same tile read from a logit block that cuBLAS wrote to memory
  (the ``"cublas"`` logit source, see ``config.LOGIT_SOURCE``).
* ``online_update``: folds one logit tile into running per-token statistics that give, at the end
  of the vocabulary, the log-sum-exp and the entropy of the softmax; ``fold_model`` adds the
  target logit; ``online_update_lse`` is the mixture's (no entropy).

Online statistics, per token and relative to the running maximum ``m``::

    s = sum_v exp(z_v - m)                  ->  lse     = m + log(s)
    t = sum_v exp(z_v - m) * (z_v - m)      ->  entropy = log(s) - t / s

Keeping ``t`` relative to ``m`` (instead of summing ``p * z``) avoids the cancellation of
``lse - sum p z`` when logits are large (|z| ~ 1e4): both terms stay O(1).
"""

import triton
import triton.language as tl


# Below this |a / c| the soft-cap uses the odd polynomial (Cephes' single-precision tanhf, relative
# error ~1e-7): the exp form (1 - e) / (1 + e) cancels catastrophically for small arguments.
SOFTCAP_POLY_LIMIT = tl.constexpr(0.625)


@triton.jit
def soft_cap(a, cap):
    """``cap * tanh(a / cap)`` to float32 precision for every positive ``cap``.

    Small ``x = a / cap`` use ``tanh x = x + x^3 P(x^2)``, written as ``a + a x^2 P(x^2)``:
    ``cap`` never multiplies a tiny quantity, so a cap of 1e30 gives back ``a`` (not 0) and 1e5
    loses nothing. Large ``|x|`` use ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)``, exact at the
    tails (``e`` -> 0).
    """
    x = a / cap
    x2 = x * x
    poly = (((-5.70498872745e-3 * x2 + 2.06390887954e-2) * x2 - 5.37397155531e-2) * x2
            + 1.33314422036e-1) * x2 - 3.33332819422e-1
    near_zero = a + a * (x2 * poly)
    e = tl.exp(-2.0 * tl.abs(x))
    tail = cap * ((1.0 - e) / (1.0 + e))
    tail = tl.where(x < 0, -tail, tail)
    return tl.where(tl.abs(x) < SOFTCAP_POLY_LIMIT, near_zero, tail)


@triton.jit
def soft_cap_slope(a, cap):
    """``d/da cap * tanh(a / cap) = sech^2(a / cap) = 4 e / (1 + e)^2``, ``e = exp(-2|a / cap|)``:
    full relative precision where the cap saturates, unlike ``1 - tanh^2``."""
    e = tl.exp(-2.0 * tl.abs(a / cap))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def grouped_tile(pid, num_token_tiles, num_vocab_tiles, group_size):
    """``(token tile, vocabulary tile)`` of program ``pid`` on a 1-D grid, in L2-friendly order.

    Programs start in ``pid`` order, so the ones running at once are consecutive: in groups of
    ``group_size`` token tiles (``config.token_tiles_per_group``), each group sweeps the whole
    vocabulary, token tile fastest. The group's hidden states then stay in L2 while the weights
    stream past them, and each weight tile is read from memory once per group, for all its
    token tiles at once. (With the token tile alone fastest, every live program would hold a
    different token tile: far more hidden states than L2 holds, re-read for every weight tile.)
    """
    per_group = group_size * num_vocab_tiles
    first = (pid // per_group) * group_size
    size = tl.minimum(num_token_tiles - first, group_size)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def accumulate_logits(
    acc, h_ptr, w_ptr, offs_n, offs_v, num_tokens, vocab, dim, stride_h, stride_w,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``acc + h W^T`` for a float32 ``[BLOCK_N, BLOCK_V]`` accumulator (rows ``offs_n``, columns
    ``offs_v``), on the tensor cores.

    ``h`` is ``[num_tokens, dim]`` with row stride ``stride_h``; ``W`` is ``[vocab, dim]`` with row
    stride ``stride_w``; both have unit column stride. Out-of-range rows/columns read zeros.
    """
    mask_n = offs_n < num_tokens
    mask_v = offs_v < vocab
    # Row pointers once per tile, in int64: V * d passes 2^31 for the largest heads.
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_w
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        h = tl.load(h_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_rows + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        if UPCAST_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def logits_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, num_tokens, vocab, dim, stride_h, stride_w, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """float32 ``[BLOCK_N, BLOCK_V]`` tile of ``softcap(h W^T + b)`` (layout as in
    ``accumulate_logits``); the caller masks the columns it must ignore."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc = accumulate_logits(acc, h_ptr, w_ptr, offs_n, offs_v, num_tokens, vocab, dim, stride_h,
                            stride_w, UPCAST_DOT, DOT_PRECISION, BLOCK_D)
    return bias_and_softcap(acc, b_ptr, offs_v, offs_v < vocab, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def mixed_logits_tile(
    hs_ptr, ws_ptr, bs_ptr, hw_ptr, ww_ptr, bw_ptr, offs_n, offs_v, num_tokens, vocab, dim_s,
    dim_w, stride_hs, stride_ws, stride_hw, stride_ww, strong_ratio, weak_weight,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_W: tl.constexpr, WEAK_IN_MIX: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """float32 tile of the mixed logits ``lam z_s + (1 - lam) z_w`` (no soft-cap) in ONE
    accumulator: ``((z_s * lam / (1 - lam)) + z_w) * (1 - lam)``, the weak products accumulating
    onto the scaled strong ones. Half the accumulator registers of two tiles, so twice the tile.

    ``strong_ratio = lam / (1 - lam)`` and ``weak_weight = 1 - lam``; ``WEAK_IN_MIX=False`` (lam
    = 1) gives ``z_s`` alone.
    """
    mask_v = offs_v < vocab
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc = accumulate_logits(acc, hs_ptr, ws_ptr, offs_n, offs_v, num_tokens, vocab, dim_s,
                            stride_hs, stride_ws, UPCAST_DOT, DOT_PRECISION, BLOCK_D)
    acc = bias_and_softcap(acc, bs_ptr, offs_v, mask_v, 1.0, HAS_BIAS_S, False)
    if WEAK_IN_MIX:
        acc = acc * strong_ratio
        acc = accumulate_logits(acc, hw_ptr, ww_ptr, offs_n, offs_v, num_tokens, vocab, dim_w,
                                stride_hw, stride_ww, UPCAST_DOT, DOT_PRECISION, BLOCK_D)
        acc = bias_and_softcap(acc, bw_ptr, offs_v, mask_v, 1.0, HAS_BIAS_W, False)
        acc = acc * weak_weight
    return acc


@triton.jit
def bias_and_softcap(z, b_ptr, offs_v, mask_v, softcap, HAS_BIAS: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr):
    """``softcap(z + b)`` for a float32 tile whose columns are ``offs_v``."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        z += bias[None, :]
    if HAS_SOFTCAP:
        z = soft_cap(z, softcap)
    return z


@triton.jit
def to_storage(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """``x`` (float32) rounded to ``dtype`` for a store, to nearest even.

    ``ROUND_BF16``: round to bfloat16 by hand first (Triton's interpreter truncates float32 to
    bfloat16, doubling the rounding error; GPUs round to nearest even, so it stays off there).
    """
    if ROUND_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def loaded_logits_tile(z_ptr, b_ptr, offs_n, offs_v, num_tokens, width, stride_z, softcap,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """float32 tile of ``softcap(z + b)`` read from a ``[num_tokens, width]`` block of raw logits.

    ``offs_v`` are columns of the block (``b_ptr`` points at the block's first bias entry).
    Out-of-range entries read zeros; the caller masks the columns it must ignore.
    """
    mask_n = offs_n < num_tokens
    mask_v = offs_v < width
    rows = z_ptr + offs_n.to(tl.int64)[:, None] * stride_z
    z = tl.load(rows + offs_v[None, :], mask=mask_n[:, None] & mask_v[None, :], other=0.0)
    return bias_and_softcap(z.to(tl.float32), b_ptr, offs_v, mask_v, softcap, HAS_BIAS,
                            HAS_SOFTCAP)


@triton.jit
def online_update(m, s, t, z):
    """Fold the tile ``z`` ``[BLOCK_N, BLOCK_V]`` into the running ``(m, s, t)`` (each ``[BLOCK_N]``).

    Masked columns must hold ``MASKED_LOGIT`` (finite): they contribute exactly zero to ``s`` and ``t``.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    shifted = z - m_new[:, None]
    e = tl.exp(shifted)
    s_new = s * alpha + tl.sum(e, axis=1)
    t_new = alpha * (t + (m - m_new) * s) + tl.sum(e * shifted, axis=1)
    return m_new, s_new, t_new


@triton.jit
def online_update_lse(m, s, z):
    """``online_update`` without the entropy sum (for the mixture, whose entropy is not needed)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    s_new = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    return m_new, s_new


@triton.jit
def merge_stats(m, s, t, m_part, s_part, t_part):
    """Merge two running ``(m, s, t)`` triples that cover disjoint vocabulary ranges."""
    m_new = tl.maximum(m, m_part)
    alpha = tl.exp(m - m_new)
    alpha_part = tl.exp(m_part - m_new)
    t_new = alpha * (t + (m - m_new) * s) + alpha_part * (t_part + (m_part - m_new) * s_part)
    return m_new, alpha * s + alpha_part * s_part, t_new


@triton.jit
def fold_model(m, s, t, zy, z, is_target):
    """Fold one model's tile ``z`` (masked columns at ``MASKED_LOGIT``) into its running
    ``(m, s, t)`` and target logit; ``is_target`` marks each row's label column."""
    m, s, t = online_update(m, s, t, z)
    return m, s, t, zy + tl.sum(tl.where(is_target, z, 0.0), axis=1)
