"""The ``torch`` engine: the fused algorithm in chunked PyTorch, for CPUs (and any device).

It computes exactly what the Triton kernels compute, block by block: the vocabulary is cut into
``vocab_block`` columns and the tokens into ``token_block`` rows; each ``[token_block,
vocab_block]`` logit block is folded into online statistics (running max ``m``, ``s = sum e^(z-m)``
and ``t = sum e^(z-m) (z-m)``, see ``wmss_kernels/logit_tiles.py``) and then dropped. The backward
recomputes each block and accumulates the gradients in float32.

Precision: everything (logits, statistics, accumulators, results) is float32, or float64 when
either model's inputs are float64; both models are then computed in float64, so a float64
strong model and a float32 weak one mix in float64.

Memory bound: besides the inputs, the O(N) statistics and the gradients themselves (float32
accumulators of the requested gradients), a handful of ``[token_block, vocab_block]`` blocks
(computed in place where possible; about ten live at the peak, counting the matrix library's own
scratch): ~20 MiB at the defaults, whatever ``N`` and ``V``.
"""

from __future__ import annotations

from typing import Optional

import torch

from wmss_kernels.config import MASKED_LOGIT

from ..autograd import FusedEngineBase
from .contract import (
    FLOAT_DTYPES,
    GradRequest,
    LogSumExps,
    LogitTokenStats,
    MixedLossSpec,
    MixedTokenStats,
    ModelGrads,
    ModelInputs,
    SingleTokenStats,
    TokenCoefficients,
    compute_dtype,
)

# Block shape of the logits held at once. 256 x 2048 float32 is 2 MiB per block: large enough
# for efficient matrix products on a CPU, small next to any realistic [N, V].
TOKEN_BLOCK = 256
VOCAB_BLOCK = 2048


class _BlockedHead:
    """One model's ``ModelInputs`` cut into logit blocks computed in ``dtype`` (float32 or
    float64)."""

    def __init__(self, inputs: ModelInputs, softcap: Optional[float], dtype: torch.dtype):
        self.hidden, self.weight, self.bias = inputs
        self.softcap, self.dtype = softcap, dtype

    def weight_block(self, vocab: slice):
        w = self.weight[vocab].to(self.dtype)
        b = None if self.bias is None else self.bias[vocab].to(self.dtype)
        return w, b

    def logits(self, tokens: slice, w, b, capped: bool = True) -> torch.Tensor:
        """``softcap(h[tokens] @ w^T + b)`` in the compute dtype (``capped=False``: before the
        cap); ``w``, ``b`` from weight_block."""
        h = self.hidden[tokens].to(self.dtype)
        z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
        if capped and self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def capped_logits_and_slope(self, tokens: slice, w, b):
        """``(z, dz/da)`` of a block: the capped logits and the cap's slope ``sech^2(a / c)``
        (None without a cap). The slope comes from ``a``: ``1 - (z / c)^2`` would cancel where
        the cap saturates."""
        a = self.logits(tokens, w, b, capped=False)
        if self.softcap is None:
            return a, None
        x = a.div_(self.softcap)
        slope = torch.cosh(x).square_().reciprocal_()
        return x.tanh_().mul_(self.softcap), slope


class _Online:
    """Running ``(m, s, t)`` and target logit of one distribution, per token; see module doc."""

    def __init__(self, num_tokens: int, device, dtype, with_entropy: bool = True):
        self.m = torch.full((num_tokens,), MASKED_LOGIT, device=device, dtype=dtype)
        self.s = torch.zeros(num_tokens, device=device, dtype=dtype)
        self.t = torch.zeros(num_tokens, device=device, dtype=dtype) if with_entropy else None
        self.target = torch.zeros(num_tokens, device=device, dtype=dtype)

    def consume(self, tokens: slice, z: torch.Tensor, targets: "_Targets") -> None:
        """Fold the block ``z`` ``[tokens, vocab block]`` in; ``z`` is overwritten (no copies)."""
        m, s = self.m[tokens], self.s[tokens]
        self.target[tokens] += targets.pick(z)
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = torch.exp(m - m_new)
        shifted = z.sub_(m_new[:, None])
        e = shifted.exp()
        if self.t is not None:
            t = self.t[tokens]
            # sum_v e * shifted per row, as a batched dot product (no [tokens, vocab] temporary).
            t_block = (e.unsqueeze(1) @ shifted.unsqueeze(2)).view(-1)
            t.copy_(alpha * (t + (m - m_new) * s) + t_block)
        s.copy_(s * alpha + e.sum(dim=1))
        m.copy_(m_new)

    def logprob_target(self) -> torch.Tensor:
        # (z[y] - m) is exact near the max; keep it apart from log s (see MixedTokenStats).
        return (self.target - self.m) - self.s.log()

    def entropy(self) -> torch.Tensor:
        return self.s.log() - self.t / self.s


class _Targets:
    """Where the labels of a token block fall inside a vocabulary block (sync-free gathers)."""

    def __init__(self, labels: torch.Tensor, tokens: slice, vocab: slice):
        y = labels[tokens]
        self.inside = (y >= vocab.start) & (y < vocab.stop)
        self.columns = (y - vocab.start).clamp(0, vocab.stop - vocab.start - 1).unsqueeze(1)

    def pick(self, z: torch.Tensor) -> torch.Tensor:
        """``z[n, y_n]`` for rows whose target is in the block, 0 elsewhere: ``[tokens]``."""
        return torch.where(self.inside, z.gather(1, self.columns).squeeze(1), 0.0)

    def subtract_onehot_(self, p: torch.Tensor) -> torch.Tensor:
        """``p - onehot(y)`` in place."""
        return p.scatter_add_(1, self.columns, -self.inside.to(p.dtype).unsqueeze(1))


def _heads(strong: ModelInputs, weak: ModelInputs,
           softcap: Optional[float]) -> tuple[_BlockedHead, _BlockedHead]:
    """Both models' heads, in the one compute dtype of the pair."""
    dtype = compute_dtype(strong.dtype, weak.dtype)
    return _BlockedHead(strong, softcap, dtype), _BlockedHead(weak, softcap, dtype)


class TorchEngine(FusedEngineBase):
    """The ``FusedEngine`` contract in chunked PyTorch.

    Results (statistics, gradients' accumulators) are in the compute dtype (see module doc).
    """

    supported_dtypes = FLOAT_DTYPES

    def __init__(self, token_block: int = TOKEN_BLOCK, vocab_block: int = VOCAB_BLOCK):
        if token_block < 1 or vocab_block < 1:
            raise ValueError("token_block and vocab_block must be positive")
        self.token_block, self.vocab_block = token_block, vocab_block

    def pinned(self) -> "TorchEngine":
        """This engine (it has no run-time configuration to fix between forward and backward)."""
        return self

    def _blocks(self, num_tokens: int, *heads: _BlockedHead):
        """``(vocab slice, token slice, [(w, b) per head])`` over every block. The vocabulary is
        the outer loop, so each weight block is cast to the compute dtype once."""
        vocab = heads[0].weight.shape[0]
        for v0 in range(0, vocab, self.vocab_block):
            vocab_slice = slice(v0, min(v0 + self.vocab_block, vocab))
            weights = [head.weight_block(vocab_slice) for head in heads]
            for n0 in range(0, num_tokens, self.token_block):
                yield vocab_slice, slice(n0, min(n0 + self.token_block, num_tokens)), weights

    @torch.no_grad()
    def mixed_forward(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                      spec: MixedLossSpec) -> MixedTokenStats:
        strong, weak = _heads(strong, weak, spec.softcap)
        num_tokens, device, dtype = labels.shape[0], labels.device, strong.dtype
        acc_s, acc_w = _Online(num_tokens, device, dtype), _Online(num_tokens, device, dtype)
        acc_m = _Online(num_tokens, device, dtype, with_entropy=False)
        for vocab_slice, tokens, weights in self._blocks(num_tokens, strong, weak):
            targets = _Targets(labels, tokens, vocab_slice)
            z_s = strong.logits(tokens, *weights[0])
            z_w = weak.logits(tokens, *weights[1])
            acc_m.consume(tokens, torch.lerp(z_w, z_s, spec.lam), targets)
            acc_s.consume(tokens, z_s, targets)
            acc_w.consume(tokens, z_w, targets)

        supervised = labels != spec.ignore_index
        h_s, h_w = acc_s.entropy(), acc_w.entropy()
        logp_s, logp_w, logp_m = (a.logprob_target() for a in (acc_s, acc_w, acc_m))
        mixed = supervised.clone()
        if spec.gap_threshold is not None:
            mixed &= (h_w - h_s) >= spec.gap_threshold
        zero = torch.zeros((), device=device, dtype=dtype)
        loss = torch.where(mixed, -logp_m, torch.where(supervised, -logp_s, zero))

        def stat(x):
            return torch.where(supervised, x, zero)

        return MixedTokenStats(loss, acc_s.m, acc_s.s.log(), acc_m.m, acc_m.s.log(), stat(h_s),
                               stat(h_w), stat(logp_s), stat(logp_w), stat(logp_m), mixed)

    @torch.no_grad()
    def single_stats(self, model: ModelInputs, labels: torch.Tensor, softcap: Optional[float],
                     ignore_index: int) -> SingleTokenStats:
        head = _BlockedHead(model, softcap, compute_dtype(model.dtype))
        num_tokens = labels.shape[0]
        acc = _Online(num_tokens, labels.device, head.dtype)
        for vocab_slice, tokens, (block,) in self._blocks(num_tokens, head):
            acc.consume(tokens, head.logits(tokens, *block), _Targets(labels, tokens, vocab_slice))
        supervised = labels != ignore_index
        zero = torch.zeros((), device=labels.device, dtype=head.dtype)
        return SingleTokenStats(torch.where(supervised, acc.entropy(), zero), acc.m + acc.s.log(),
                                torch.where(supervised, acc.logprob_target(), zero))

    @torch.no_grad()
    def logit_stats(self, model: ModelInputs, labels: Optional[torch.Tensor],
                    softcap: Optional[float], ignore_index: int) -> LogitTokenStats:
        """``LogitTokenStats`` in one blocked pass (see the contract for the fields).

        The target logit is computed first, token block by token block, as the dot product of
        each hidden state with its label's weight row (``[token_block, d]`` at a time); the pass
        then folds every logit block into the online ``(m, s, t)`` and into the non-target
        sum, maximum and count of logits above the target, with exactly the label's column
        left out. The non-target sum is accumulated apart (not ``sum - z[y]``), which would
        cancel when ``z[y]`` dominates the row.
        """
        head = _BlockedHead(model, softcap, compute_dtype(model.dtype))
        num_tokens, vocab = head.hidden.shape[0], head.weight.shape[0]
        device, dtype = head.hidden.device, head.dtype
        if labels is None:
            scored = torch.ones(num_tokens, dtype=torch.bool, device=device)
            has_target = torch.zeros_like(scored)
            targets_of = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        else:
            scored = has_target = labels != ignore_index
            targets_of = torch.where(has_target, labels, -1)  # -1 matches no column
        target = self._target_logits(head, targets_of)
        acc = _Online(num_tokens, device, dtype)
        nontarget_sum = torch.zeros(num_tokens, device=device, dtype=dtype)
        nontarget_max = torch.full((num_tokens,), MASKED_LOGIT, device=device, dtype=dtype)
        above = torch.zeros(num_tokens, device=device, dtype=torch.long)
        for vocab_slice, tokens, (block,) in self._blocks(num_tokens, head):
            z = head.logits(tokens, *block)
            targets = _Targets(targets_of, tokens, vocab_slice)
            # The label's column set to 0 for the sum, then to MASKED_LOGIT for the max and the
            # count; ``z`` itself stays whole for the online statistics.
            nontarget = z.scatter(1, targets.columns,
                                  torch.where(targets.inside[:, None], 0.0,
                                              z.gather(1, targets.columns)))
            nontarget_sum[tokens] += nontarget.sum(dim=1)
            nontarget.scatter_(1, targets.columns,
                               torch.where(targets.inside[:, None], MASKED_LOGIT,
                                           nontarget.gather(1, targets.columns)))
            torch.maximum(nontarget_max[tokens], nontarget.amax(dim=1),
                          out=nontarget_max[tokens])
            above[tokens] += (nontarget > target[tokens, None]).sum(dim=1)
            acc.consume(tokens, z, targets)
        return _logit_token_stats(scored, has_target, vocab, target, nontarget_sum,
                                  nontarget_max, above, acc)

    def _target_logits(self, head: _BlockedHead, targets_of: torch.Tensor) -> torch.Tensor:
        """``z[n, y_n]`` in the compute dtype, 0 where ``y_n`` is -1: ``[N]``."""
        target = torch.zeros(targets_of.shape[0], device=targets_of.device, dtype=head.dtype)
        vocab = head.weight.shape[0]
        for n0 in range(0, targets_of.shape[0], self.token_block):
            tokens = slice(n0, min(n0 + self.token_block, targets_of.shape[0]))
            y = targets_of[tokens].clamp(0, vocab - 1)
            h = head.hidden[tokens].to(head.dtype)
            z = (h * head.weight[y].to(head.dtype)).sum(dim=1)
            if head.bias is not None:
                z += head.bias[y].to(head.dtype)
            if head.softcap is not None:
                z = head.softcap * torch.tanh(z / head.softcap)
            target[tokens] = torch.where(targets_of[tokens] >= 0, z, 0.0)
        return target

    @torch.no_grad()
    def mixed_backward(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                       lse: LogSumExps, coefficients: TokenCoefficients, spec: MixedLossSpec,
                       requests: tuple[GradRequest, GradRequest]) -> tuple[ModelGrads, ModelGrads]:
        """Gradients of ``sum_n c_n loss_n``; arguments as in ``wmss_kernels.mixed_ce_backward``."""
        strong, weak = _heads(strong, weak, spec.softcap)
        strong_request, weak_request = requests
        max_strong, logsum_strong, max_mix, logsum_mix = lse
        coef_mix, coef_strong = coefficients
        lam = spec.lam
        num_tokens = labels.shape[0]

        def accumulators(head, request):  # float32 (float64 for float64 inputs)
            def zeros(shape, needed):
                return torch.zeros(shape, device=labels.device, dtype=head.dtype) if needed else None
            return ModelGrads(zeros(head.hidden.shape, request.hidden),
                              zeros(head.weight.shape, request.weight),
                              zeros(head.weight.shape[:1], request.bias))

        grads_s, grads_w = accumulators(strong, strong_request), accumulators(weak, weak_request)
        if not (strong_request.any or weak_request.any):
            return grads_s, grads_w
        for vocab_slice, tokens, weights in self._blocks(num_tokens, strong, weak):
            targets = _Targets(labels, tokens, vocab_slice)
            z_s, slope_s = strong.capped_logits_and_slope(tokens, *weights[0])
            z_w, slope_w = weak.capped_logits_and_slope(tokens, *weights[1])
            # g_mix = c_mix * (softmax(z_m) - onehot), built in place in the mixture's block.
            g_mix = torch.lerp(z_w, z_s, lam)
            g_mix.sub_(max_mix[tokens, None]).sub_(logsum_mix[tokens, None]).exp_()
            targets.subtract_onehot_(g_mix).mul_(coef_mix[tokens, None])
            if strong_request.any:
                g_s = g_mix * lam
                if coef_strong is not None:
                    p_s = z_s.sub_(max_strong[tokens, None]).sub_(logsum_strong[tokens, None]).exp_()
                    g_s.add_(targets.subtract_onehot_(p_s).mul_(coef_strong[tokens, None]))
                if slope_s is not None:
                    g_s.mul_(slope_s)
                self._accumulate(grads_s, strong, g_s, weights[0][0], tokens, vocab_slice)
            if weak_request.any:
                g_w = g_mix.mul_(1.0 - lam)
                if slope_w is not None:
                    g_w.mul_(slope_w)
                self._accumulate(grads_w, weak, g_w, weights[1][0], tokens, vocab_slice)
        return grads_s, grads_w

    @staticmethod
    def _accumulate(grads: ModelGrads, head: _BlockedHead, g: torch.Tensor, w: torch.Tensor,
                    tokens: slice, vocab: slice) -> None:
        """Add one block's contribution: dh += g w, dW += g^T h, db += sum g."""
        if grads.hidden is not None:
            grads.hidden[tokens].addmm_(g, w)
        if grads.weight is not None:
            grads.weight[vocab].addmm_(g.t(), head.hidden[tokens].to(head.dtype))
        if grads.bias is not None:
            grads.bias[vocab] += g.sum(dim=0)


def _logit_token_stats(scored: torch.Tensor, has_target: torch.Tensor, vocab: int,
                       target: torch.Tensor, nontarget_sum: torch.Tensor,
                       nontarget_max: torch.Tensor, above: torch.Tensor,
                       acc: _Online) -> LogitTokenStats:
    """The contract's fields from the pass's per-token accumulators (0 where not defined)."""
    nontarget_count = vocab - has_target.to(torch.long)
    has_nontarget = scored & (nontarget_count > 0)
    both = has_target & has_nontarget

    def where(mask, x):
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))

    mean = (nontarget_sum + target) / vocab
    return LogitTokenStats(
        target_logit=where(has_target, target),
        mean_logit=where(scored, mean),
        mean_nontarget_logit=where(has_nontarget, nontarget_sum / nontarget_count.clamp_min(1)),
        max_nontarget_logit=where(has_nontarget, nontarget_max),
        margin=where(both, target - nontarget_max),
        rank=where(both, above),
        entropy=where(scored, acc.entropy()),
        logprob=where(has_target, (target - acc.m) - acc.s.log()),
    )
