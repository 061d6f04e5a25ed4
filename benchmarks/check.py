"""Before anything is timed, each provider's result is checked against a float64 truth.

The truth is the plain formula (SPEC section 2) evaluated in float64 on the same inputs (rounded
to the benchmark dtype first, so only the provider's arithmetic is judged): for ``fused_loss`` the
mean mixed cross-entropy and its four gradients, for ``token_entropy`` the entropies. A provider
passes when every relative error ``||got - truth|| / ||truth||`` is within the dtype's tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .providers import IGNORE_INDEX, LEAVES, Problem, Provider
from .shapes import TOLERANCE


@dataclass(frozen=True)
class CheckResult:
    """Relative error of each checked quantity (inf: missing or non-finite) and the tolerance."""

    errors: dict
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(e <= self.tolerance for e in self.errors.values())

    @property
    def worst(self) -> float:
        return max(self.errors.values())

    def summary(self) -> str:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in self.errors.items())
        verdict = "ok" if self.ok else "MISMATCH"
        return f"{verdict}: relative errors {errors} (tolerance {self.tolerance:.0e})"


def relative_error(got: Optional[torch.Tensor], truth: torch.Tensor) -> float:
    """``||got - truth|| / ||truth||`` in float64; inf when ``got`` is missing, misshapen or
    non-finite."""
    if got is None or got.shape != truth.shape:
        return float("inf")
    got = got.detach().to(torch.float64)
    if not torch.isfinite(got).all():
        return float("inf")
    scale = truth.norm()
    diff = (got - truth).norm()
    return float(diff / scale) if scale > 0 else float(diff)


def _capped(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def truth_fused_loss(inputs: dict, lam: float, softcap: Optional[float]) -> dict:
    """Float64 mean mixed cross-entropy (softcap per model before mixing) and its gradients."""
    x = {k: inputs[k].detach().to(torch.float64).requires_grad_() for k in LEAVES}
    z_s = _capped(x["strong_hidden"] @ x["strong_weight"].T, softcap)
    z_w = _capped(x["weak_hidden"] @ x["weak_weight"].T, softcap)
    loss = F.cross_entropy(lam * z_s + (1.0 - lam) * z_w, inputs["labels"],
                           ignore_index=IGNORE_INDEX)
    loss.backward()
    return {"loss": loss.detach(), **{k: x[k].grad for k in LEAVES}}


@torch.no_grad()
def truth_entropy(hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float]):
    log_p = _capped(hidden.to(torch.float64) @ weight.to(torch.float64).T, softcap).log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def check(provider: Provider, problem: Problem, inputs: dict) -> CheckResult:
    """Run ``provider`` once on ``inputs`` (fresh gradients) and compare with the truth."""
    for leaf in LEAVES:
        if leaf in inputs:
            inputs[leaf].grad = None
    if problem.kernel == "fused_loss":
        loss = provider.loss(problem, inputs)
        loss.backward()
        got = {"loss": loss, **{k: inputs[k].grad for k in LEAVES}}
        truth = truth_fused_loss(inputs, problem.lam, problem.softcap)
    else:
        got = {"entropy": provider.entropy(problem, inputs)}
        truth = {"entropy": truth_entropy(inputs["strong_hidden"], inputs["strong_weight"],
                                          problem.softcap)}
    errors = {k: relative_error(got[k], truth[k]) for k in truth}
    for leaf in LEAVES:
        if leaf in inputs:
            inputs[leaf].grad = None
    return CheckResult(errors, TOLERANCE[problem.dtype])
