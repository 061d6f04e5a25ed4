"""The implementations a user could pick, each computing the same loss (or entropies).

A provider turns a ``Problem`` and its inputs into a ``Step`` for a mode:

* ``fused_loss`` inputs are leaf tensors ``strong_hidden [N, d_s]``, ``strong_weight [V, d_s]``,
  ``weak_hidden [N, d_w]``, ``weak_weight [V, d_w]`` (requires_grad) and ``labels [N]`` int64;
  ``loss()`` returns the mean mixed cross-entropy, a float32 scalar that backpropagates to all four.
  Modes: ``forward`` (the training forward, graph kept), ``backward`` (``loss.backward`` of a
  forward done outside the timed call), ``full`` (both).
* ``token_entropy`` uses the strong head only: ``entropy()`` returns float32 ``[N]`` entropies
  (no gradient). Mode: ``forward``.

``inputs.make_inputs`` draws the inputs (the same for every provider at a point). Each provider
says which kernels, devices and dtypes it supports and which optional package it needs
(``unsupported()`` gives the reason, or None).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import wmss
from wmss import defaults

from .shapes import LAM, HeadShape

IGNORE_INDEX = defaults.IGNORE_INDEX


@dataclass(frozen=True)
class Problem:
    """One benchmark point."""

    kernel: str
    shape: HeadShape
    dtype: torch.dtype
    tokens: int
    device: torch.device
    lam: float = LAM
    inputs: str = "gaussian"  # how the inputs are drawn (inputs.py, shapes.INPUT_MODES)

    @property
    def softcap(self) -> Optional[float]:
        return self.shape.softcap


LEAVES = ("strong_hidden", "strong_weight", "weak_hidden", "weak_weight")


def leaves(inputs: dict) -> list[torch.Tensor]:
    """The tensors whose gradients a step produces (reset to None before every timed call)."""
    return [inputs[k] for k in LEAVES if k in inputs and inputs[k].requires_grad]


@dataclass
class Step:
    """One timed call: ``prepare()`` runs untimed first (e.g. the forward of a backward-only
    measurement), ``run()`` is what is timed, ``release()`` drops what ``prepare`` kept."""

    run: Callable[[], Any]
    grads: list = field(default_factory=list)
    prepare: Callable[[], None] = lambda: None
    release: Callable[[], None] = lambda: None


def autograd_step(forward: Callable[[], torch.Tensor], mode: str, grads: list) -> Step:
    """forward / backward / full steps of a differentiable scalar ``forward()``."""
    if mode == "forward":
        return Step(run=forward, grads=grads)
    if mode == "full":
        return Step(run=lambda: forward().backward(), grads=grads)
    if mode == "backward":
        kept = {}
        # A fresh forward before every timed backward (no retain_graph: buffers the backward
        # frees or donates behave as in training).
        return Step(run=lambda: kept["loss"].backward(), grads=grads,
                    prepare=lambda: kept.update(loss=forward()), release=kept.clear)
    raise ValueError(f"unknown mode {mode!r}")


class Provider:
    """Base class: declares support, builds steps from ``loss()`` / ``entropy()``."""

    name = ""
    kernels: tuple = ("fused_loss", "token_entropy")
    devices: tuple = ("cpu", "cuda")
    dtypes: tuple = (torch.bfloat16, torch.float32)
    package: Optional[str] = None  # import name of an optional dependency
    checked = True  # whether its result can be checked against the truth
    measures_memory = True
    trains = LEAVES  # the leaves its fused_loss step computes gradients for (the ones checked)

    def implements(self, kernel: str) -> bool:
        return kernel in self.kernels

    def unsupported(self, problem: Problem) -> Optional[str]:
        """Why this provider cannot run ``problem`` here, or None."""
        if problem.device.type not in self.devices:
            return f"needs {' or '.join(d.upper() for d in self.devices)}"
        if problem.dtype not in self.dtypes:
            return f"does not support {str(problem.dtype).removeprefix('torch.')}"
        if self.package is not None and importlib.util.find_spec(self.package) is None:
            return f"package {self.package} not installed"
        return None

    def package_version(self) -> Optional[str]:
        if self.package is None:
            return None
        from importlib import metadata

        try:
            return metadata.version(self.package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            return None

    def loss(self, problem: Problem, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def entropy(self, problem: Problem, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def make_step(self, problem: Problem, inputs: dict, mode: str) -> Step:
        if problem.kernel == "fused_loss":
            return autograd_step(lambda: self.loss(problem, inputs), mode, leaves(inputs))
        if mode != "forward":
            raise ValueError(f"token_entropy has no {mode!r} mode")
        return Step(run=lambda: self.entropy(problem, inputs))


# ---- eager PyTorch, as the method's authors write it -------------------------------------------

def _capped(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    # In the logits' dtype, as Hugging Face's Gemma models do before the loss.
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def naive_mixed_loss(strong_hidden, strong_weight, weak_hidden, weak_weight, labels,
                     lam: float, softcap: Optional[float]) -> torch.Tensor:
    """Both models' logits ``[N, V]``, the mix, then ``F.cross_entropy`` in float32."""
    z_s = _capped(strong_hidden @ strong_weight.T, softcap)
    z_w = _capped(weak_hidden @ weak_weight.T, softcap)
    z = lam * z_s + (1.0 - lam) * z_w
    return F.cross_entropy(z.float(), labels, ignore_index=IGNORE_INDEX)


def naive_entropy(hidden, weight, softcap: Optional[float]) -> torch.Tensor:
    """Logits ``[N, V]``, float32 log-softmax, ``-sum p log p``."""
    log_p = _capped(hidden @ weight.T, softcap).float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


class Naive(Provider):
    name = "naive"

    def loss(self, problem, inputs):
        return naive_mixed_loss(inputs["strong_hidden"], inputs["strong_weight"],
                                inputs["weak_hidden"], inputs["weak_weight"], inputs["labels"],
                                problem.lam, problem.softcap)

    def entropy(self, problem, inputs):
        with torch.no_grad():
            return naive_entropy(inputs["strong_hidden"], inputs["strong_weight"], problem.softcap)


class TorchCompile(Naive):
    """The eager formulas under ``torch.compile`` (inductor, full graph, token dim dynamic).

    The token dimension is marked dynamic so one compilation serves the whole token sweep of a
    (kernel, shape, dtype); dynamo's caches are reset between those, so no group hits the
    recompile limit (past which dynamo would silently fall back to eager).
    """

    name = "torch_compile"

    def __init__(self):
        self._key = None
        self._compiled: dict[Callable, Callable] = {}

    def _fn(self, problem: Problem, eager: Callable) -> Callable:
        key = (problem.kernel, problem.shape, problem.dtype, problem.device)
        if key != self._key:
            torch._dynamo.reset()
            self._key, self._compiled = key, {}
        if eager not in self._compiled:
            self._compiled[eager] = torch.compile(eager, fullgraph=True)
        return self._compiled[eager]

    @staticmethod
    def _dynamic_tokens(*tensors):
        for t in tensors:
            torch._dynamo.mark_dynamic(t, 0)

    def loss(self, problem, inputs):
        args = [inputs[k] for k in (*LEAVES, "labels")]
        self._dynamic_tokens(args[0], args[2], args[4])
        return self._fn(problem, naive_mixed_loss)(*args, problem.lam, problem.softcap)

    def entropy(self, problem, inputs):
        hidden = inputs["strong_hidden"]
        self._dynamic_tokens(hidden)
        with torch.no_grad():
            return self._fn(problem, naive_entropy)(hidden, inputs["strong_weight"],
                                                    problem.softcap)


# ---- fused linear cross-entropy libraries on the concatenated inputs ----------------------------

def concatenated(inputs: dict, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[lam h_s, (1 - lam) h_w]`` ``[N, d_s + d_w]`` and ``[W_s, W_w]`` ``[V, d_s + d_w]``.

    Their product is exactly the mixed logits ``lam z_s + (1 - lam) z_w``, so a single-model fused
    linear cross-entropy computes the mixed loss; autograd maps the gradients back to the four
    leaves. The concatenation is part of the timed cost: a user would have to do it every step.
    """
    hidden = torch.cat([lam * inputs["strong_hidden"], (1.0 - lam) * inputs["weak_hidden"]], dim=1)
    weight = torch.cat([inputs["strong_weight"], inputs["weak_weight"]], dim=1)
    return hidden, weight


class _Concat(Provider):
    kernels = ("fused_loss",)
    devices = ("cuda",)  # Triton kernels written for GPUs

    def unsupported(self, problem):
        if problem.softcap is not None:
            # softcap(z_mix) is not lam softcap(z_s) + (1 - lam) softcap(z_w).
            return ("softcap applies per model before mixing; on concatenated inputs it would "
                    "cap the mix")
        return super().unsupported(problem)


class LigerConcat(_Concat):
    """Liger-Kernel's fused linear cross-entropy (gradients computed in the forward, chunked).

    ``accum_dtype=float32``: weight gradients accumulate in float32, as wmss's do (Liger's default
    accumulates them in the parameters' dtype).
    """

    name = "liger_concat"
    package = "liger_kernel"

    def loss(self, problem, inputs):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        hidden, weight = concatenated(inputs, problem.lam)
        return liger_fused_linear_cross_entropy(hidden, weight, inputs["labels"],
                                                ignore_index=IGNORE_INDEX, reduction="mean",
                                                accum_dtype=torch.float32)


class CCEConcat(_Concat):
    """Cut Cross-Entropy (Apple): logits only in on-chip memory, backward recomputes them.

    ``filter_eps=None`` turns off its gradient filtering (by default it skips the gradient of
    softmax entries below 2^-12 in bf16, most of a 150k vocabulary's entries, so the gradients
    are approximate). Its backward takes bf16/fp16 embeddings only; weight gradients accumulate in
    the embeddings' dtype (atomics).
    """

    name = "cce_concat"
    package = "cut_cross_entropy"
    dtypes = (torch.bfloat16,)

    def loss(self, problem, inputs):
        from cut_cross_entropy import linear_cross_entropy

        hidden, weight = concatenated(inputs, problem.lam)
        return linear_cross_entropy(hidden, weight, inputs["labels"], ignore_index=IGNORE_INDEX,
                                    reduction="mean", filter_eps=None, impl="cce")


# ---- the matrix products alone: the floor -------------------------------------------------------

class GemmFloor(Provider):
    """The products a step cannot avoid, timed alone (cuBLAS, full token count at once):

    forward ``z_s = h_s W_s^T``, ``z_w = h_w W_w^T``; backward ``dh = G W`` and ``dW = G^T h`` for
    each model with a random ``G [N, V]``; full = all six; ``token_entropy`` = one forward product.
    Output buffers are allocated outside the timed call; no loss, so nothing to check, and no
    memory figure (its buffers are the ``[N, V]`` logits the fused kernels avoid).
    """

    name = "gemm_floor"
    checked = False
    measures_memory = False

    def make_step(self, problem, inputs, mode):
        detached = {k: t.detach() for k, t in inputs.items() if k != "labels"}
        n, v = problem.tokens, problem.shape.vocab
        buffer = torch.empty(n, v, device=problem.device, dtype=problem.dtype)
        heads = [(detached["strong_hidden"], detached["strong_weight"])]
        if problem.kernel == "token_entropy":
            if mode != "forward":
                raise ValueError(f"token_entropy has no {mode!r} mode")
            return Step(run=lambda: torch.mm(heads[0][0], heads[0][1].t(), out=buffer))
        heads.append((detached["weak_hidden"], detached["weak_weight"]))
        grad = buffer.normal_()  # the logit gradient G; forward products overwrite it (no matter)
        grad_buffers = [(torch.empty_like(h), torch.empty_like(w)) for h, w in heads]

        def forward():
            for h, w in heads:
                torch.mm(h, w.t(), out=buffer)

        def backward():
            for (h, w), (dh, dw) in zip(heads, grad_buffers):
                torch.mm(grad, w, out=dh)
                torch.mm(grad.t(), h, out=dw)

        def full():
            forward()
            backward()

        return Step(run={"forward": forward, "backward": backward, "full": full}[mode])


# ---- wmss ---------------------------------------------------------------------------------------

class WmssTorch(Provider):
    """``wmss.fused_loss`` / ``wmss.token_entropy`` with the chunked PyTorch backend."""

    name = "wmss_torch"
    backend = "torch"

    def loss(self, problem, inputs):
        return wmss.fused_loss(*(inputs[k] for k in LEAVES), inputs["labels"], lam=problem.lam,
                               softcap=problem.softcap, backend=self.backend)

    def entropy(self, problem, inputs):
        return wmss.token_entropy(inputs["strong_hidden"], inputs["strong_weight"],
                                  softcap=problem.softcap, backend=self.backend)


class WmssNative(WmssTorch):
    """The C++ CPU extension of ``csrc/`` (``backend="native"``), built on first use."""

    name = "wmss_native"
    backend = "native"
    devices = ("cpu",)

    def unsupported(self, problem):
        from wmss.loss.engines import native_engine

        reason = super().unsupported(problem)
        if reason is None and not native_engine.available():
            return f"native engine unavailable: {native_engine.unavailable_reason()}"
        return reason


class WmssTriton(WmssTorch):
    """The fused Triton kernels (CUDA; the CPU interpreter is a correctness path, not timed)."""

    name = "wmss_triton"
    backend = "triton"
    devices = ("cuda",)


class WmssTritonCublas(WmssTriton):
    """The Triton kernels reading logit blocks that cuBLAS writes (``LOGIT_SOURCE = "cublas"``),
    against ``wmss_triton``'s in-kernel ``tl.dot`` tiles: which is faster is a property of the GPU
    and the Triton version, so the benchmark measures both."""

    name = "wmss_triton_cublas"
    logit_source = "cublas"

    def loss(self, problem, inputs):
        with _logit_source(self.logit_source):  # the backward keeps the forward's source
            return super().loss(problem, inputs)

    def entropy(self, problem, inputs):
        with _logit_source(self.logit_source):
            return super().entropy(problem, inputs)


@contextlib.contextmanager
def _logit_source(source: str):
    from wmss_kernels import config

    saved, config.LOGIT_SOURCE = config.LOGIT_SOURCE, source
    try:
        yield
    finally:
        config.LOGIT_SOURCE = saved


# ---- wmss options, against the plain call of the same backend ---------------------------------

def default_wmss(device_type: str) -> str:
    """The wmss provider of the backend ``fused_loss`` picks by default on ``device_type``
    (``backend="auto"``: Triton on CUDA, the native engine on CPUs)."""
    return "wmss_triton" if device_type == "cuda" else "wmss_native"


class _WmssOption(WmssTorch):
    """``wmss.fused_loss`` on the default backend's provider (``default_wmss``) with one option
    set: the report's targets compare the two."""

    kernels = ("fused_loss",)

    def unsupported(self, problem):
        return PROVIDERS[default_wmss(problem.device.type)].unsupported(problem)

    def options(self) -> dict:
        raise NotImplementedError

    def loss(self, problem, inputs):
        backend = PROVIDERS[default_wmss(problem.device.type)].backend
        return wmss.fused_loss(*(inputs[k] for k in LEAVES), inputs["labels"], lam=problem.lam,
                               softcap=problem.softcap, backend=backend, **self.options())


class WmssStats(_WmssOption):
    """``return_stats=True``: the per-token entropies, log-probs and mixed mask come from the
    same pass (WD-DS and the trainer's logging ask for them every step)."""

    name = "wmss_stats"

    def options(self):
        return {"return_stats": True}

    def loss(self, problem, inputs):
        loss, _stats = super().loss(problem, inputs)
        return loss


class WmssFrozenWeak(_WmssOption):
    """``train_weak=False``: the weak model is frozen, so no gradient reaches it and its products
    are skipped (the strong model's two gradients are the ones checked)."""

    name = "wmss_frozen_weak"
    trains = ("strong_hidden", "strong_weight")

    def options(self):
        return {"train_weak": False}


PROVIDERS = {p.name: p for p in (Naive(), TorchCompile(), LigerConcat(), CCEConcat(), GemmFloor(),
                                 WmssTorch(), WmssNative(), WmssTriton(), WmssTritonCublas(),
                                 WmssStats(), WmssFrozenWeak())}
PEERS = ("naive", "torch_compile", "liger_concat", "cce_concat")  # what wmss is compared against
FLOOR = "gemm_floor"
