"""Before anything is timed, every provider is judged by one rule: its error against float64,
compared with the error of the plain formula in the input dtype.

* **Exact**: the formula (docs/design.md section 1.1) in float64 on the same inputs (already
  rounded to the benchmark dtype, so only arithmetic is judged): for ``fused_loss`` the mean mixed
  cross-entropy and its four gradients, for ``token_entropy`` the entropies.
* **Plain**: the ``naive`` provider's arithmetic on the same inputs, i.e. what plain PyTorch code
  computes in the input dtype: both logits materialised, softcapped and mixed in that dtype (bf16
  matmuls for bf16 inputs, float32 for float32), ``F.cross_entropy`` on float32 logits (as Hugging
  Face models call it), gradients back in the input dtype.
* **Error** of an output: the norm-based relative error ``||got - exact||_2 / ||exact||_2`` over
  the whole tensor (Frobenius norm; for the scalar loss ``|got - exact| / |exact|``), in float64;
  ``inf`` when the output is missing, misshapen or not finite.
* **Rule**: a provider passes when, for every output,
  ``error <= ERROR_FACTOR * plain_error + ERROR_FLOOR`` (``shapes.py``).

This is the criterion Cut Cross-Entropy states for itself (its tests accept its result when its
error against a higher-precision ground truth is within the error of the plain PyTorch formula
run in the input dtype, plus a tolerance): a provider may be as inexact as the formula every user
already trusts, a small factor more, but not an order of magnitude. Norms replace its elementwise
comparison, so an error is judged on the whole gradient rather than its noisiest entry. A fixed
tolerance instead either passes a float32 provider with bf16-grade errors or fails a bf16 one
that is exactly as good as plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .providers import IGNORE_INDEX, LEAVES, Naive, Problem, Provider
from .shapes import ERROR_FACTOR, ERROR_FLOOR

PLAIN = Naive()  # the plain formula every provider's error is compared with


@dataclass(frozen=True)
class OutputError:
    """One output's relative error against float64: the provider's and the plain formula's."""

    error: float
    plain: float

    @property
    def limit(self) -> float:
        return ERROR_FACTOR * self.plain + ERROR_FLOOR

    @property
    def ok(self) -> bool:
        return self.error <= self.limit

    def text(self) -> str:
        return f"{self.error:.1e} (plain {self.plain:.1e})"


@dataclass(frozen=True)
class Reference:
    """What every provider of one point is judged against: the float64 outputs and the plain
    formula's relative error on each of them."""

    exact: dict  # output name -> float64 tensor
    plain_errors: dict  # output name -> float


@dataclass(frozen=True)
class CheckResult:
    """Each checked output's errors (provider's, plain formula's) at ``tokens`` tokens."""

    outputs: dict  # output name -> OutputError
    tokens: int

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs.values())

    @property
    def failed(self) -> list[str]:
        return [name for name, o in self.outputs.items() if not o.ok]

    def summary(self) -> str:
        """One line: the verdict, each output's error next to the plain formula's, the rule."""
        errors = ", ".join(f"{name} {o.text()}" for name, o in self.outputs.items())
        verdict = "ok" if self.ok else f"MISMATCH in {', '.join(self.failed)}"
        return (f"{verdict}: relative errors {errors}; passes at <= {ERROR_FACTOR:g}x plain "
                f"+ {ERROR_FLOOR:.0e}")

    def config(self) -> dict:
        """The CSV ``config`` entry: both errors of every output, and the rule that judged them."""
        return {"tokens": self.tokens, "factor": ERROR_FACTOR, "floor": ERROR_FLOOR,
                "error": {k: _rounded(o.error) for k, o in self.outputs.items()},
                "plain_error": {k: _rounded(o.plain) for k, o in self.outputs.items()}}


def _rounded(x: float) -> Optional[float]:
    """Three significant digits for the CSV; None (JSON null) for inf."""
    return float(f"{x:.3g}") if x != float("inf") else None


def relative_error(got: Optional[torch.Tensor], exact: torch.Tensor) -> float:
    """``||got - exact|| / ||exact||`` in float64; the absolute ``||got - exact||`` when ``exact``
    is 0; inf when ``got`` is missing, misshapen or non-finite."""
    if got is None or got.shape != exact.shape:
        return float("inf")
    got = got.detach().to(torch.float64)
    if not torch.isfinite(got).all():
        return float("inf")
    scale = exact.norm()
    diff = (got - exact).norm()
    return float(diff / scale) if scale > 0 else float(diff)


# ---- float64 ------------------------------------------------------------------------------------

def _capped(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def exact_fused_loss(inputs: dict, lam: float, softcap: Optional[float]) -> dict:
    """Float64 mean mixed cross-entropy (softcap per model before mixing) and its gradients."""
    x = {k: inputs[k].detach().to(torch.float64).requires_grad_() for k in LEAVES}
    z_s = _capped(x["strong_hidden"] @ x["strong_weight"].T, softcap)
    z_w = _capped(x["weak_hidden"] @ x["weak_weight"].T, softcap)
    loss = F.cross_entropy(lam * z_s + (1.0 - lam) * z_w, inputs["labels"],
                           ignore_index=IGNORE_INDEX)
    loss.backward()
    return {"loss": loss.detach(), **{k: x[k].grad for k in LEAVES}}


@torch.no_grad()
def exact_entropy(hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float]):
    """Float64 ``[N]`` entropies of one head."""
    log_p = _capped(hidden.to(torch.float64) @ weight.to(torch.float64).T, softcap).log_softmax(-1)
    return {"entropy": -(log_p.exp() * log_p).sum(-1)}


def exact_outputs(problem: Problem, inputs: dict) -> dict:
    if problem.kernel == "fused_loss":
        return exact_fused_loss(inputs, problem.lam, problem.softcap)
    return exact_entropy(inputs["strong_hidden"], inputs["strong_weight"], problem.softcap)


# ---- a provider's outputs -----------------------------------------------------------------------

def _clear_grads(inputs: dict) -> None:
    for leaf in LEAVES:
        if leaf in inputs:
            inputs[leaf].grad = None


def provider_outputs(provider: Provider, problem: Problem, inputs: dict) -> dict:
    """One call of ``provider`` on ``inputs`` with fresh gradients: ``loss`` and the gradients of
    the leaves it trains (``fused_loss``: all four, or ``provider.trains``) or ``entropy``
    (``token_entropy``); the inputs' gradients are cleared again afterwards."""
    _clear_grads(inputs)
    try:
        if problem.kernel == "fused_loss":
            loss = provider.loss(problem, inputs)
            loss.backward()
            return {"loss": loss.detach(), **{k: inputs[k].grad for k in provider.trains}}
        return {"entropy": provider.entropy(problem, inputs)}
    finally:
        _clear_grads(inputs)


def reference(problem: Problem, inputs: dict) -> Reference:
    """The float64 outputs and the plain formula's error on each (once per point)."""
    exact = exact_outputs(problem, inputs)
    plain = provider_outputs(PLAIN, problem, inputs)
    return Reference(exact, {k: relative_error(plain.get(k), exact[k]) for k in exact})


def check(provider: Provider, problem: Problem, inputs: dict,
          ref: Optional[Reference] = None) -> CheckResult:
    """Run ``provider`` once on ``inputs`` and judge each output it computes by the rule (module
    doc): the loss and the gradients of the leaves it trains, or the entropies. ``ref`` is
    computed here when not given (pass it to judge several providers on one point)."""
    ref = reference(problem, inputs) if ref is None else ref
    got = provider_outputs(provider, problem, inputs)
    judged = ("loss", *provider.trains) if problem.kernel == "fused_loss" else tuple(ref.exact)
    outputs = {k: OutputError(relative_error(got.get(k), ref.exact[k]), ref.plain_errors[k])
               for k in judged}
    return CheckResult(outputs, problem.tokens)
