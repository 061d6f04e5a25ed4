"""The inputs every provider is given, built from a seed on the benchmark's device.

Two modes (``--inputs``), the same for every provider at a point:

* ``gaussian`` (the default, as in earlier results): hidden ~ N(0, 1), weight
  ~ N(0, LOGIT_SCALE^2 / d), uniform labels. Logits are Gaussian with std ~LOGIT_SCALE, so every
  token's distribution is broad (entropy near ``log V``) and no logit stands out.
* ``realistic``: each token's next-token distribution is peaked and heavy-tailed like a trained
  LM's (mean entropy of order 1-3 nats, the top probability above 0.5 for most tokens, a loss of
  a few nats). That is what a kernel meets in training; filtering or sparsity tricks only show
  their effect (and their error) on such logits.

How ``realistic`` logits come about (the numbers are ``shapes.REALISTIC``). Each model's lm head is
``W = R + prior u^T``: ``R [V, d]`` random rows of norm ~1, ``u`` a random unit direction, and
``prior[v] = top_logit - s log(rank[v])`` a Zipf log-frequency of the token's rank (ranks are a
random permutation of the vocabulary, so no provider meets a frequency-sorted vocabulary). Each
hidden state is ``h = u + b_label R[label] / |R[label]|^2 + b_rival R[rival] / |R[rival]|^2 + e``
with ``e`` Gaussian noise orthogonal to ``u``. So a token's logits are

    z[v] = prior[v] + noise[v] + b_label [v == label] + b_rival [v == rival],
    noise[v] ~ N(0, context_noise^2)

(plus a crosstalk of order ``b / sqrt(d)``): the Zipf prior and the noise make the heavy tail, the
two boosts the peak. Labels and rivals are drawn from the Zipf frequencies; the boosts are
Gaussian per token, so the label wins most tokens and loses some to its rival (a wrong guess
costs a few nats, as in a real model). The weak model sees the same labels, rivals and token
ranks, has its own ``R``, ``u`` and noise, and boosts scaled by ``weak_confidence``.

Cost: ``O(V d + N d)`` work and memory, as the Gaussian mode; nothing ``[N, V]`` is built.
"""

from __future__ import annotations

from typing import Optional

import torch

from .providers import Problem
from .shapes import INPUT_MODES, LOGIT_SCALE, REALISTIC, RealisticLogits


def make_inputs(problem: Problem, seed: int) -> dict[str, torch.Tensor]:
    """The inputs of ``problem`` in its dtype, from ``seed``, in ``problem.inputs``'s mode.

    Returns ``strong_hidden [N, d_s]``, ``strong_weight [V, d_s]``, ``labels [N]`` int64 and, for
    ``fused_loss``, ``weak_hidden [N, d_w]``, ``weak_weight [V, d_w]``; the floating tensors are
    leaves that require grad for ``fused_loss``.
    """
    if problem.inputs not in INPUT_MODES:
        raise ValueError(f"unknown inputs {problem.inputs!r}; choose from {', '.join(INPUT_MODES)}")
    generator = torch.Generator(device=problem.device).manual_seed(seed)
    build = gaussian_inputs if problem.inputs == "gaussian" else realistic_inputs
    raw = build(problem, generator)
    grad = problem.kernel == "fused_loss"
    return {k: t if k == "labels" else t.to(problem.dtype).requires_grad_(grad)
            for k, t in raw.items()}


def _with_weak(problem: Problem) -> bool:
    return problem.kernel == "fused_loss"  # token_entropy measures the strong head alone


# ---- gaussian -----------------------------------------------------------------------------------

def gaussian_inputs(problem: Problem, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """float32 hidden ~ N(0, 1), weight ~ N(0, LOGIT_SCALE^2 / d), uniform labels.

    The draw order is the one of earlier versions, so old and new Gaussian results share inputs.
    """
    device, shape = problem.device, problem.shape
    n, v = problem.tokens, shape.vocab

    def normal(rows: int, cols: int, scale: float) -> torch.Tensor:
        return torch.randn(rows, cols, device=device, generator=generator).mul_(scale)

    inputs = {
        "strong_hidden": normal(n, shape.d_strong, 1.0),
        "strong_weight": normal(v, shape.d_strong, LOGIT_SCALE / shape.d_strong ** 0.5),
        "labels": torch.randint(0, v, (n,), device=device, generator=generator),
    }
    if _with_weak(problem):
        inputs["weak_hidden"] = normal(n, shape.d_weak, 1.0)
        inputs["weak_weight"] = normal(v, shape.d_weak, LOGIT_SCALE / shape.d_weak ** 0.5)
    return inputs


# ---- realistic ----------------------------------------------------------------------------------

def realistic_inputs(problem: Problem, generator: torch.Generator,
                     settings: RealisticLogits = REALISTIC) -> dict[str, torch.Tensor]:
    """float32 hidden states and lm heads whose logits are peaked and heavy-tailed (module doc)."""
    device, shape = problem.device, problem.shape
    n, v = problem.tokens, shape.vocab
    log_frequency = zipf_log_frequency(v, settings.zipf_exponent, generator, device)
    frequency = log_frequency.softmax(0)
    labels = torch.multinomial(frequency, n, replacement=True, generator=generator)
    rivals = torch.multinomial(frequency, n, replacement=True, generator=generator)
    prior = log_frequency.add_(settings.top_logit)  # [V]; log_frequency is not used again

    def head(width: int, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
        return realistic_head(prior, labels, rivals, width, confidence, settings, generator)

    inputs = {}
    inputs["strong_hidden"], inputs["strong_weight"] = head(shape.d_strong, 1.0)
    inputs["labels"] = labels
    if _with_weak(problem):
        inputs["weak_hidden"], inputs["weak_weight"] = head(shape.d_weak,
                                                            settings.weak_confidence)
    return inputs


def zipf_log_frequency(vocab: int, exponent: float, generator: torch.Generator,
                       device: torch.device) -> torch.Tensor:
    """float32 ``[V]``: ``-exponent * log(rank)``, the ranks 1..V in a random order."""
    ranks = torch.randperm(vocab, device=device, generator=generator).add_(1)
    return ranks.to(torch.float32).log_().mul_(-exponent)


def realistic_head(prior: torch.Tensor, labels: torch.Tensor, rivals: torch.Tensor, width: int,
                   confidence: float, settings: RealisticLogits,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One model's float32 hidden states ``[N, width]`` and lm head ``[V, width]``.

    ``prior [V]`` is every token's context-free logit; ``labels``, ``rivals`` ``[N]`` the tokens
    each hidden state is pushed towards, by ``confidence`` times the boosts of ``settings``.
    """
    device = prior.device
    n, v = labels.numel(), prior.numel()
    direction = torch.randn(width, device=device, generator=generator)
    direction /= direction.norm()
    rows = torch.randn(v, width, device=device, generator=generator).div_(width ** 0.5)
    hidden = _noise_orthogonal_to(direction, n, settings.context_noise, generator)
    hidden += direction  # h . (prior[v] u) = prior[v]: every logit gets its token's prior
    for tokens, (mean, std) in ((labels, settings.label_boost), (rivals, settings.rival_boost)):
        boost = torch.randn(n, device=device, generator=generator).mul_(std).add_(mean)
        hidden += _towards(rows[tokens], boost.mul_(confidence))
    weight = rows.addr_(prior, direction)  # in place: no second [V, d] buffer
    return hidden, weight


def _towards(rows: torch.Tensor, boost: torch.Tensor) -> torch.Tensor:
    """``[N, d]`` vectors ``x`` with ``x . rows[i] = boost[i]`` (along each row)."""
    return rows * (boost / rows.square().sum(1)).unsqueeze(1)


def _noise_orthogonal_to(direction: torch.Tensor, n: int, std: float,
                         generator: Optional[torch.Generator]) -> torch.Tensor:
    """``[N, d]`` Gaussian noise of ``std`` per entry with its ``direction`` component removed.

    Along ``direction`` the noise would scale every token's prior (``h . u`` multiplies it), turning
    some distributions flat; orthogonal to it, it only adds independent noise to each logit.
    """
    noise = torch.randn(n, direction.numel(), device=direction.device, generator=generator)
    noise.mul_(std)
    noise -= torch.outer(noise @ direction, direction)
    return noise
