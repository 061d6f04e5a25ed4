"""Building blocks shared by the forward and backward kernels.

* ``logits_tile``: one ``[BLOCK_N, BLOCK_V]`` tile of ``h @ W^T (+ b)``, optionally soft-capped,
  accumulated in float32 on the tensor cores; the full logits never exist in memory.
* ``online_update``: folds one logit tile into running per-token statistics that give, at the end
  of the vocabulary, the log-sum-exp and the entropy of the softmax.

Online statistics, per token and relative to the running maximum ``m``::

    s = sum_v exp(z_v - m)                  ->  lse     = m + log(s)
    t = sum_v exp(z_v - m) * (z_v - m)      ->  entropy = log(s) - t / s

Keeping ``t`` relative to ``m`` (instead of summing ``p * z``) avoids the cancellation of
``lse - sum p z`` when logits are large (|z| ~ 1e4): both terms stay O(1).
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh through exp, exact at both tails (exp overflow gives +-1, never NaN)."""
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


@triton.jit
def logits_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, num_tokens, vocab, dim, stride_h, stride_w, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """float32 ``[BLOCK_N, BLOCK_V]`` tile of ``softcap(h W^T + b)``.

    ``h`` is ``[num_tokens, dim]`` with row stride ``stride_h``; ``W`` is ``[vocab, dim]`` with row
    stride ``stride_w``; both have unit column stride. Out-of-range rows/columns read zeros; the
    caller masks the columns it must ignore.
    """
    mask_n = offs_n < num_tokens
    mask_v = offs_v < vocab
    # Row pointers once per tile, in int64: V * d passes 2^31 for the largest heads.
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        h = tl.load(h_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_rows + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        if UPCAST_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc += bias[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc


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
