"""The engine contract: what the public layer hands an engine and what it gets back.

Every backend of ``wmss.fused_loss`` and ``wmss.token_entropy`` is an ``Engine``. The inputs are
already validated, flat and cast (``wmss.loss.inputs``): one ``ModelInputs`` per model, int64
labels ``[N]`` and a ``MixedLossSpec``. Two kinds of engine implement the contract:

* a ``FusedEngine`` ("torch", "triton") computes the forward statistics and, separately, the
  gradients of ``sum_n c_n loss_n``; the custom ops of ``wmss.loss.autograd`` join the two into
  one differentiable operation, and its ``FusedEngineBase`` gives every fused engine its
  ``mixed_loss`` (and the ``key`` the ops name it by);
* the reference engine writes the formula with materialised logits and lets autograd
  differentiate it (to any order).

docs/design.md section 3 describes the contract; this module is its one definition in code. It
is plain PyTorch: the Triton launchers of ``wmss_kernels`` take and return these types too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol, runtime_checkable

import torch

#: Every dtype the public functions accept for hidden states, weights and biases.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ModelInputs(NamedTuple):
    """One model's inputs to its lm head: ``z = softcap(hidden @ weight^T + bias)``.

    Attributes:
        hidden: ``[N, d]`` final hidden states (``[..., d]`` before the public layer flattens).
        weight: ``[V, d]`` lm-head weight, in ``hidden``'s dtype.
        bias: ``[V]`` lm-head bias in the same dtype, or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ModelInputs":
        """``fn`` applied to each tensor (None stays None)."""
        return ModelInputs(*(None if t is None else fn(t) for t in self))

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True)
class MixedLossSpec:
    """The scalar options every engine sees (validated by ``wmss.loss.options``).

    Attributes:
        lam: mixing weight in [0, 1]: ``z_mix = lam * z_strong + (1 - lam) * z_weak``.
        softcap: final-logit cap ``c * tanh(z / c)`` applied to each model before mixing, or None.
        gap_threshold: gap masking; a supervised token with ``H_weak - H_strong < gap_threshold``
            is trained with plain strong cross-entropy. None mixes every supervised token.
        ignore_index: the label of positions that are not supervised.
    """

    lam: float
    softcap: Optional[float]
    gap_threshold: Optional[float]
    ignore_index: int


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype of the accumulation and of the results for inputs of ``dtypes``: float64 if any
    is float64, else float32 (half-precision inputs accumulate in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class MixedTokenStats(NamedTuple):
    """Per-token forward outputs of the mixed loss; ``[N]`` in the compute dtype (float32, or
    float64 for a float64 pair on the torch and reference engines).

    ``loss`` and the ``entropy_*``/``logprob_*`` statistics are 0 at ignored positions;
    ``mixed`` is bool (the token used the mixed loss).

    The log-sum-exp of the strong and of the mixed logits, which the backward needs, is kept as
    the pair ``(max_*, logsum_*)`` with ``lse = max + logsum``: a single float32 ``lse`` near
    |z| ~ 1e4 carries an absolute error of ~5e-4, and ``softmax = exp((z - max) - logsum)`` would
    inherit it; the pair keeps float32's relative precision at any logit offset.
    """

    loss: torch.Tensor
    max_strong: torch.Tensor
    logsum_strong: torch.Tensor
    max_mix: torch.Tensor
    logsum_mix: torch.Tensor
    entropy_strong: torch.Tensor
    entropy_weak: torch.Tensor
    logprob_strong: torch.Tensor
    logprob_weak: torch.Tensor
    logprob_mix: torch.Tensor
    mixed: torch.Tensor

    @property
    def log_sum_exps(self) -> "LogSumExps":
        """What the backward needs from the forward."""
        return LogSumExps(self.max_strong, self.logsum_strong, self.max_mix, self.logsum_mix)


class SingleTokenStats(NamedTuple):
    """Per-token statistics of one model, ``[N]`` in the compute dtype; entropy and logprob are 0
    where the label is ``ignore_index``."""

    entropy: torch.Tensor
    lse: torch.Tensor
    logprob: torch.Tensor


class LogitTokenStats(NamedTuple):
    """Per-token logit statistics of one model (``logit_stats``): ``[N]`` tensors in the compute
    dtype (float32, or float64 on the torch and reference engines for float64 inputs), ``rank``
    int64.

    With ``z`` the token's logits over the ``V`` vocabulary entries and ``y`` its label:

    * ``target_logit = z[y]``; ``logprob = z[y] - lse(z)``; ``entropy`` of ``softmax(z)``;
    * ``mean_logit = sum_v z_v / V``;
    * ``mean_nontarget_logit`` and ``max_nontarget_logit``: mean and max over the ``V - 1``
      columns other than ``y`` (exactly the column ``y`` is left out, whatever its value);
    * ``margin = z[y] - max_nontarget_logit``;
    * ``rank``: how many non-target columns have a logit strictly greater than ``z[y]`` (0: the
      target is a top-1 prediction; ties do not count).

    Every field is 0 where the label is ``ignore_index``. Labels ``None`` (no targets): every
    position is scored, the target-dependent fields (``target_logit``, ``margin``, ``rank``,
    ``logprob``) are 0, and every column counts as non-target (``mean_nontarget_logit`` is
    ``mean_logit``, ``max_nontarget_logit`` the largest logit). With ``V = 1`` and a target there
    is no non-target column: ``mean_nontarget_logit``, ``max_nontarget_logit``, ``margin`` and
    ``rank`` are 0.
    """

    target_logit: torch.Tensor
    mean_logit: torch.Tensor
    mean_nontarget_logit: torch.Tensor
    max_nontarget_logit: torch.Tensor
    margin: torch.Tensor
    rank: torch.Tensor
    entropy: torch.Tensor
    logprob: torch.Tensor


class LogSumExps(NamedTuple):
    """The forward's log-sum-exps of the strong and of the mixed logits, each as the pair
    ``(max, logsum)`` (see ``MixedTokenStats``): ``[N]`` in the compute dtype."""

    max_strong: torch.Tensor
    logsum_strong: torch.Tensor
    max_mix: torch.Tensor
    logsum_mix: torch.Tensor


class TokenCoefficients(NamedTuple):
    """The upstream gradient of each token's loss, split by the loss the token was trained with:
    ``[N]`` in the compute dtype.

    Attributes:
        mix: ``dL/dloss_n`` of tokens trained with the mixed loss, 0 elsewhere.
        strong: the same for supervised tokens trained with plain strong cross-entropy under gap
            masking, 0 elsewhere; None when gap masking is off.
    """

    mix: torch.Tensor
    strong: Optional[torch.Tensor]


class GradRequest(NamedTuple):
    """Which of one model's gradients to compute (``needs_input_grad`` of hidden, weight, bias)."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


class ModelGrads(NamedTuple):
    """One model's gradients; an entry is None when it was not requested.

    Each is either in its input's dtype or a float32 (float64) accumulator (the Triton launcher
    returns ``hidden`` and ``weight`` in the inputs' dtypes and ``bias`` in float32; the torch
    engine returns accumulators in the compute dtype): the autograd layer casts them to the
    inputs' dtypes.
    """

    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


@runtime_checkable
class Engine(Protocol):
    """A backend: what ``fused_loss`` and ``token_entropy`` call, with validated flat inputs."""

    #: Input dtypes the engine computes with; ``wmss.loss.engines.resolve`` checks them.
    supported_dtypes: tuple[torch.dtype, ...]

    def mixed_loss(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                   spec: MixedLossSpec) -> MixedTokenStats:
        """Per-token loss (differentiable with respect to both models' inputs) and statistics."""
        ...

    def single_stats(self, model: ModelInputs, labels: torch.Tensor, softcap: Optional[float],
                     ignore_index: int) -> SingleTokenStats:
        """One model's per-token statistics, without gradient."""
        ...

    # Optional (not every engine has it; ``wmss.logit_stats`` falls back to the torch engine):
    #
    # def logit_stats(self, model: ModelInputs, labels: Optional[torch.Tensor],
    #                 softcap: Optional[float], ignore_index: int) -> LogitTokenStats:
    #     """One model's ``LogitTokenStats`` (labels ``[N]`` int64, or None: no targets),
    #     without gradient and, on the fused engines, without ``[N, V]`` logits."""
    #
    # It is not a Protocol member, so that ``isinstance(x, Engine)`` keeps holding for engines
    # written before it; ``has_logit_stats`` tells whether an engine provides it.


def has_forward_grads(engine) -> bool:
    """Whether the fused ``engine`` implements the optional ``mixed_forward_with_grads`` of
    ``FusedEngine`` (the autograd layer then uses it when gradients will be needed)."""
    return callable(getattr(engine, "mixed_forward_with_grads", None))


def has_logit_stats(engine) -> bool:
    """Whether ``engine`` implements the optional ``logit_stats`` method of ``Engine``."""
    return callable(getattr(engine, "logit_stats", None))


@runtime_checkable
class FusedEngine(Engine, Protocol):
    """An engine whose loss is computed by fused forward and backward passes (no logits kept).

    ``mixed_loss`` comes from ``wmss.loss.autograd.FusedEngineBase``: its custom ops call
    ``mixed_forward`` of the ``pinned()`` engine at the forward and its ``mixed_backward`` at the
    backward, naming it by ``key`` (class and attributes: an engine's attributes are plain
    values, its configuration).
    """

    @property
    def key(self) -> str:
        """The engine as text the custom ops carry (``FusedEngineBase.key``)."""
        ...

    def pinned(self) -> "FusedEngine":
        """The engine with its run-time configuration fixed, so a backward matches its forward."""
        ...

    def mixed_forward(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                      spec: MixedLossSpec) -> MixedTokenStats:
        """Per-token loss and statistics, without gradient."""
        ...

    def mixed_backward(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                       lse: LogSumExps, coefficients: TokenCoefficients, spec: MixedLossSpec,
                       requests: tuple[GradRequest, GradRequest]) -> tuple[ModelGrads, ModelGrads]:
        """Gradients of ``sum_n c_n loss_n`` for the strong and the weak model, as requested."""
        ...

    # Optional (``has_forward_grads`` tells whether an engine provides it; the "native" engine
    # does):
    #
    # def mixed_forward_with_grads(self, strong: ModelInputs, weak: ModelInputs,
    #                              labels: torch.Tensor, spec: MixedLossSpec,
    #                              requests: tuple[GradRequest, GradRequest]
    #                              ) -> tuple[MixedTokenStats, tuple[ModelGrads, ModelGrads]]:
    #     """``mixed_forward``'s statistics and, as requested, the gradients of
    #     ``sum_n u_n loss_n`` for the unit upstream gradient (``u_n = 1`` at every supervised
    #     token, 0 at ignored ones), each in the compute dtype and its input's shape.
    #
    #     One pass instead of a forward and a recomputing backward. The autograd layer scales
    #     the ``hidden`` rows by each token's upstream gradient, and ``weight``/``bias`` by the
    #     common one when every supervised token has the same (reductions "mean" and "sum");
    #     otherwise it asks ``mixed_backward`` for those two."""
    #
    # Not a Protocol member, so that engines without it still satisfy ``FusedEngine``.
