"""Backward of the mixed-logit loss: logit gradients from recomputed tiles, then four cuBLAS products.

With ``g = softmax(z_m) - onehot(y)`` and each token's upstream gradient ``c`` split into
``c_mix`` (mixed tokens) and ``c_strong`` (supervised tokens that gap masking sent to plain CE)::

    dL/dz_s = lam * c_mix * g + c_strong * (softmax(z_s) - onehot(y))
    dL/dz_w = (1 - lam) * c_mix * g

and, through the soft-cap ``z = c tanh(a / c)``, ``dL/da = dL/dz * (1 - (z / c)^2)``.

The tokens are processed in chunks. For each chunk, ``_logit_grad_kernel`` (grid: token tiles x
vocabulary tiles) recomputes both models' logit tiles on the tensor cores, forms ``dL/da`` from
the forward's log-sum-exps, and writes it to a ``[chunk, V]`` buffer per model in the compute
dtype (one buffer for both when neither soft-capping nor gap masking is on: the two gradients
are then ``lam g`` and ``(1 - lam) g``). cuBLAS then gives ``dh = dA @ W``, ``dW += dA^T @ h`` (float32 accumulation across
chunks) and ``db += sum(dA)``. Every reduction runs in a fixed order: results are deterministic.
Buffers are sized by ``config.GRAD_CHUNK_BYTES``; nothing ``[N, V]`` is ever allocated.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import config
from .logit_tiles import logits_tile
from .results import GradRequest, ModelGrads

_MASKED = tl.constexpr(config.MASKED_LOGIT)
# torch.addmm(..., out_dtype=) (PyTorch >= 2.8): low-precision operands, float32 accumulator.
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


@triton.jit
def _logit_grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, hw_ptr, ww_ptr, bw_ptr, labels_ptr, max_s_ptr, logsum_s_ptr,
    max_m_ptr, logsum_m_ptr, coef_mix_ptr, coef_strong_ptr, grad_s_ptr, grad_w_ptr,
    num_tokens, vocab, dim_s, dim_w, stride_hs, stride_ws, stride_hw, stride_ww, stride_grad,
    lam, strong_scale, softcap,
    STORE_S: tl.constexpr, STORE_W: tl.constexpr, HAS_GAP: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_W: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < num_tokens
    mask = mask_n[:, None] & (offs_v < vocab)[None, :]

    y = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    onehot = (offs_v[None, :] == y[:, None]).to(tl.float32)
    coef_mix = tl.load(coef_mix_ptr + offs_n, mask=mask_n, other=0.0)
    max_m = tl.load(max_m_ptr + offs_n, mask=mask_n, other=0.0)
    logsum_m = tl.load(logsum_m_ptr + offs_n, mask=mask_n, other=0.0)

    # Both models' logits are needed for the mixture's softmax, even when one takes no gradient.
    z_s = logits_tile(hs_ptr, ws_ptr, bs_ptr, offs_n, offs_v, num_tokens, vocab, dim_s, stride_hs,
                      stride_ws, softcap, HAS_BIAS_S, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION,
                      BLOCK_N, BLOCK_V, BLOCK_D)
    z_w = logits_tile(hw_ptr, ww_ptr, bw_ptr, offs_n, offs_v, num_tokens, vocab, dim_w, stride_hw,
                      stride_ww, softcap, HAS_BIAS_W, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION,
                      BLOCK_N, BLOCK_V, BLOCK_D)
    # softmax = exp((z - max) - log s): z - max is exact near the max, at any logit offset.
    # Lanes outside the tile's valid rows/columns are pinned to exp(MASKED) = 0 (no overflow).
    z_m = lam * z_s + (1.0 - lam) * z_w
    p_m = tl.exp(tl.where(mask, (z_m - max_m[:, None]) - logsum_m[:, None], _MASKED))
    g_mix = coef_mix[:, None] * (p_m - onehot)
    out_offsets = offs_n.to(tl.int64)[:, None] * stride_grad + offs_v[None, :]

    if STORE_S:
        g_s = strong_scale * g_mix  # lam, or 1 when the buffer is shared by both models
        if HAS_GAP:
            coef_strong = tl.load(coef_strong_ptr + offs_n, mask=mask_n, other=0.0)
            max_s = tl.load(max_s_ptr + offs_n, mask=mask_n, other=0.0)
            logsum_s = tl.load(logsum_s_ptr + offs_n, mask=mask_n, other=0.0)
            p_s = tl.exp(tl.where(mask, (z_s - max_s[:, None]) - logsum_s[:, None], _MASKED))
            g_s += coef_strong[:, None] * (p_s - onehot)
        if HAS_SOFTCAP:
            g_s *= 1.0 - (z_s / softcap) * (z_s / softcap)
        tl.store(grad_s_ptr + out_offsets, g_s.to(grad_s_ptr.dtype.element_ty), mask=mask)
    if STORE_W:
        g_w = (1.0 - lam) * g_mix
        if HAS_SOFTCAP:
            g_w *= 1.0 - (z_w / softcap) * (z_w / softcap)
        tl.store(grad_w_ptr + out_offsets, g_w.to(grad_w_ptr.dtype.element_ty), mask=mask)


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        alpha: float) -> None:
    """``acc += alpha * a @ b`` with ``acc`` float32 and ``a``, ``b`` in a model's dtype.

    On CUDA, cuBLAS multiplies bf16/fp16 operands and accumulates straight into the float32
    ``acc`` (no rounded intermediate, no extra pass over ``acc``). Elsewhere (the interpreter)
    the operands are upcast.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
    elif a.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, alpha=alpha, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), alpha=alpha)


def _chunk_tokens(num_tokens: int, vocab: int, bytes_per_entry: int, block_n: int,
                  budget_bytes: int) -> int:
    """Tokens per chunk: as many as ``budget_bytes`` of logit-gradient buffers allow, tile-aligned."""
    per_token = max(1, vocab * bytes_per_entry)
    chunk = max(block_n, budget_bytes // per_token // block_n * block_n)
    return min(chunk, max(num_tokens, 1))


def _model_grads(request: GradRequest, hidden, weight, bias) -> tuple:
    """Allocate a model's outputs: dh in the compute dtype, float32 accumulators for dW and db."""
    dh = torch.empty_like(hidden) if request.hidden else None
    dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if request.weight else None
    db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if request.bias else None
    return dh, dw, db


def mixed_ce_backward(
    strong_hidden: torch.Tensor, strong_weight: torch.Tensor, strong_bias: Optional[torch.Tensor],
    weak_hidden: torch.Tensor, weak_weight: torch.Tensor, weak_bias: Optional[torch.Tensor],
    labels: torch.Tensor, max_strong: torch.Tensor, logsum_strong: torch.Tensor,
    max_mix: torch.Tensor, logsum_mix: torch.Tensor, coef_mix: torch.Tensor,
    coef_strong: Optional[torch.Tensor], *, lam: float,
    softcap: Optional[float], strong_request: GradRequest, weak_request: GradRequest,
    tiles: config.Tiles = config.GRAD_TILES, chunk_bytes: int = config.GRAD_CHUNK_BYTES,
) -> tuple[ModelGrads, ModelGrads]:
    """Gradients of ``sum_n c_n * loss_n`` with respect to both models' inputs.

    Args:
        strong_hidden ... weak_bias: as in ``fused_stats.mixed_token_stats``.
        labels: ``[N]`` int64.
        max_strong, logsum_strong, max_mix, logsum_mix: float32 ``[N]`` log-sum-exps of the strong
            and mixed logits from the forward, as (max, log-sum) pairs.
        coef_mix: float32 ``[N]``, the upstream gradient of mixed tokens (0 elsewhere).
        coef_strong: float32 ``[N]``, the upstream gradient of supervised tokens trained with plain
            strong CE under gap masking (0 elsewhere); None when gap masking is off.
        strong_request, weak_request: which gradients to compute; the others come back as None and
            cost nothing (no weak request at all skips the weak products and buffers).
        tiles, chunk_bytes: launch overrides (tests, tuning).

    Returns:
        ``(strong, weak)`` ``ModelGrads``. ``hidden`` grads are in the hidden dtype; ``weight`` and
        ``bias`` grads are float32 (the caller casts them to the parameters' dtypes).
    """
    num_tokens, vocab = strong_hidden.shape[0], strong_weight.shape[0]
    store_s, store_w = strong_request.any, weak_request.any
    dh_s, dw_s, db_s = _model_grads(strong_request, strong_hidden, strong_weight, strong_bias)
    dh_w, dw_w, db_w = _model_grads(weak_request, weak_hidden, weak_weight, weak_bias)
    if num_tokens == 0 or not (store_s or store_w):
        return ModelGrads(dh_s, dw_s, db_s), ModelGrads(dh_w, dw_w, db_w)

    has_gap = coef_strong is not None
    # Without soft-capping and gap masking, dL/dz_s = lam g and dL/dz_w = (1 - lam) g: one buffer
    # holds g for both models (half the bytes written and read), scaled in the products instead.
    shared = (store_s and store_w and softcap is None and not has_gap
              and strong_hidden.dtype == weak_hidden.dtype)
    if shared:
        store_w = False
    alpha_s, alpha_w = (lam, 1.0 - lam) if shared else (1.0, 1.0)
    # Each logit gradient is stored in its model's dtype, the operand dtype of its products.
    bytes_per_entry = (strong_hidden.element_size() if store_s else 0) + (
        weak_hidden.element_size() if store_w else 0)
    chunk = _chunk_tokens(num_tokens, vocab, bytes_per_entry, tiles.block_n, chunk_bytes)
    device = strong_hidden.device
    grad_s = torch.empty((chunk, vocab), device=device, dtype=strong_hidden.dtype) if store_s else None
    grad_w = torch.empty((chunk, vocab), device=device, dtype=weak_hidden.dtype) if store_w else None
    launch_flags = dict(
        STORE_S=store_s, STORE_W=store_w, HAS_GAP=has_gap, HAS_BIAS_S=strong_bias is not None,
        HAS_BIAS_W=weak_bias is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST_DOT=config.upcast_dot_operands(), DOT_PRECISION=config.dot_precision(),
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    # Placeholders for pointers a launch does not read (the kernel never dereferences them).
    unused = max_mix
    for start in range(0, num_tokens, chunk):
        stop = min(start + chunk, num_tokens)
        rows = stop - start
        hs, hw = strong_hidden[start:stop], weak_hidden[start:stop]
        gs = grad_s[:rows] if store_s else None
        gw = grad_w[:rows] if store_w else (gs if shared else None)
        grid = (triton.cdiv(rows, tiles.block_n), triton.cdiv(vocab, tiles.block_v))
        _logit_grad_kernel[grid](
            hs, strong_weight, strong_bias if strong_bias is not None else unused,
            hw, weak_weight, weak_bias if weak_bias is not None else unused,
            labels[start:stop], max_strong[start:stop], logsum_strong[start:stop],
            max_mix[start:stop], logsum_mix[start:stop], coef_mix[start:stop],
            coef_strong[start:stop] if has_gap else unused,
            gs if store_s else grad_w, gw if store_w else grad_s,
            rows, vocab, hs.shape[1], hw.shape[1], hs.stride(0), strong_weight.stride(0),
            hw.stride(0), weak_weight.stride(0), vocab, float(lam), 1.0 if shared else float(lam),
            float(softcap or 1.0), **launch_flags,
        )
        for grad, alpha, hidden, weight, dh, dw, db in (
                (gs, alpha_s, hs, strong_weight, dh_s, dw_s, db_s),
                (gw, alpha_w, hw, weak_weight, dh_w, dw_w, db_w)):
            if dh is not None:  # beta=0: the uninitialised output is ignored, not scaled
                torch.addmm(dh[start:stop], grad, weight, beta=0, alpha=alpha, out=dh[start:stop])
            if dw is not None:
                _accumulate_product(dw, grad.t(), hidden, alpha)
            if db is not None:
                db.add_(grad.sum(dim=0, dtype=torch.float32), alpha=alpha)
    return ModelGrads(dh_s, dw_s, db_s), ModelGrads(dh_w, dw_w, db_w)
