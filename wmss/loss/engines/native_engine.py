"""The ``native`` engine: the fused algorithm as a C++ CPU extension (``csrc/``), built on first
use.

Same algorithm, options, precision and results as the ``torch`` engine (docs/design.md sections
2.1-2.3), without its ~10 elementwise passes over every logit block: per ``[token_block,
vocab_block]`` block, the library's BLAS (ATen's matrix product) writes the raw logits, then one
pass per row adds the bias, applies the soft-cap, forms the mixture and folds the strong, weak
and mixed distributions into their online ``(m, s, t)`` statistics; the backward recomputes each
block and turns it in place into the logit gradients (softmax, one-hot, gap-masking term, cap
slope) that two more products turn into ``dh`` and ``dW``. OpenMP threads share out the token
blocks of each vocabulary block (see ``csrc/fused_loss.cpp`` for why not finer).

A training step (grad mode on and some input requiring a gradient: the autograd layer then calls
``mixed_forward_with_grads``) makes the floor's 6 products, not 8: the forward takes chunks of
``token_block`` tokens over the whole vocabulary, keeps the chunk's raw logits of both models,
completes its statistics, turns the logits into the logit gradients for a unit upstream gradient
in place and at once into ``dh`` rows and ``dW``, ``db`` contributions. The backward only scales
them (``wmss.loss.autograd``: ``dh`` row by row; ``dW``, ``db`` by the upstream gradient the
supervised tokens share, as reductions "mean" and "sum" give); per-token upstream gradients
(``reduction="none"`` then a weighted sum) make the backward recompute ``dW`` and ``db``
(4 more products; ``dh`` still from the forward). Evaluation (no_grad, inputs without
gradients) runs the statistics-only forward. For bf16 models the four gradient products of that
forward take the logit gradients rounded to bf16 and the bf16 inputs (oneDNN's bf16 products,
each block's product rounded once and added to float32 accumulators): every gradient stays
within 2.5x the error of the exact one rounded to bf16 (tests/test_native.py).

Precision: logits, statistics and accumulators in float32, or float64 when either model is
float64 (both then in float64): the torch engine's rule. A bf16 model's logits come from
``csrc/bf16_gemm.h`` where the CPU has AVX512-BF16: bf16 operands, float32 accumulation, at
oneDNN's bf16 speed (~3x float32 products on the 2-core AMD EPYC) and without a float32 copy of
the weight. Elsewhere, or with ``WMSS_NATIVE_BF16=0``, bf16 blocks are converted to float32
(``torch.ops.wmss_native.bf16_kernel_available()`` says which). The exp and soft-cap of the float32
pass are polynomial (~1 ulp, the Triton kernels' soft-cap); float64 uses the C library.

Memory bound: besides the inputs, the O(N) statistics and the gradients (``dh`` accumulated in
the compute dtype; ``dW``, ``db`` in the weight's dtype, each vocabulary block written once), per
thread two ``[token_block, vocab_block]`` blocks in the compute dtype and a ``[vocab_block, d]``
weight-gradient partial sum per trained model, plus a converted weight block per model: ~12 MiB
per thread at the defaults (256 x 2048, d = 512), whatever ``N`` and ``V``. Non-contiguous inputs
are read block by block (each block copied to a contiguous one), never copied whole.

Memory bound of a training step (the forward with gradients): from the forward to the backward,
the unit-upstream gradients of the trained inputs in the compute dtype (the size of the gradients
the backward returns; twice their bytes for bf16/fp16 weights); during the forward, two
``[token_block, V]`` compute-dtype logit chunks (64 MiB at 256 x 32768 in float32), a
``[token_block, d]`` ``dh`` partial per thread and model, and a copy of each weight: the bf16
kernel's packed panels for a bf16 model (the weight's own bytes), a compute-dtype copy of a weight
that is half precision without the kernel or strided, none for a contiguous float32 or float64
one. The backward scales the unit gradients in place and returns
them (eager; a second backward through a retained graph recomputes); a compiled step's backward
scales copies, a second set until autograd frees the first. Nothing ``[N, V]``.

The ops are torch custom ops (``torch.ops.wmss_native.mixed_forward``, ``mixed_forward_grads``,
``mixed_backward``, ``single_stats``) with fake implementations registered here, so
``torch.compile`` can trace a call. ``load()`` builds the extension once per process with
``torch.utils.cpp_extension`` (g++ and ninja; 20-30 s on 2 cores the first time) into a cache
directory, ``$WMSS_NATIVE_CACHE`` or ``~/.cache/wmss/native-<hash>`` (the hash covers the
sources, the flags, the torch version and the CPU, since the code is built for the machine's
instruction set); later processes load it in well under a second. ``WMSS_NATIVE=0`` turns the engine off (``backend="auto"`` then uses
``"torch"`` on CPUs, ``backend="native"`` raises).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

from ..autograd import FusedEngineBase
from .contract import (
    FLOAT_DTYPES,
    GradRequest,
    LogSumExps,
    MixedLossSpec,
    MixedTokenStats,
    ModelGrads,
    ModelInputs,
    SingleTokenStats,
    TokenCoefficients,
    compute_dtype,
)

# The torch engine's block shape, named once there (2 MiB float32 blocks; measured here too: the
# blocked products of a step take no longer than unblocked ones).
from .torch_engine import TOKEN_BLOCK, VOCAB_BLOCK  # noqa: E402

#: Environment variable: "0" turns the native engine off.
ENABLE_ENV = "WMSS_NATIVE"
#: Environment variable: the directory the extension is built in and loaded from.
CACHE_ENV = "WMSS_NATIVE_CACHE"
#: Environment variable: "0" computes bf16 models' logits from float32 copies instead of the
#: AVX512-BF16 kernel (read by the C++ code at every call).
BF16_KERNEL_ENV = "WMSS_NATIVE_BF16"

SOURCE_DIR = Path(__file__).resolve().parents[3] / "csrc"
SOURCES = ("fused_loss.cpp",)
HEADERS = ("bf16_gemm.h", "elementwise.h")
LIBRARY = "wmss_native"
CFLAGS = ("-O3", "-fopenmp", "-march=native")
LDFLAGS = ("-fopenmp",)


class NativeUnavailable(RuntimeError):
    """The native extension cannot be used here; the message says why."""


def disabled() -> bool:
    """Whether ``WMSS_NATIVE=0`` turned the engine off."""
    return os.environ.get(ENABLE_ENV, "1").strip() == "0"


def _cpu_signature() -> str:
    """What ``-march=native`` builds for: the CPU's model and instruction-set flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = [line for line in text.splitlines() if line.split(":")[0].strip() in wanted]
    return "\n".join(sorted(set(lines)))


def cache_directory() -> Path:
    """Where the extension is built: ``$WMSS_NATIVE_CACHE``, or a folder under ``~/.cache/wmss``
    named by the hash of everything the binary depends on."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    for part in (torch.__version__, " ".join(CFLAGS + LDFLAGS), platform.machine(),
                 _cpu_signature(), os.environ.get("CXX", "")):
        digest.update(part.encode() + b"\0")
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "wmss" / f"native-{digest.hexdigest()[:16]}"


_build_lock = threading.Lock()
_loaded = False  # set once the ops are registered: the engine's calls then skip load()


@functools.lru_cache(maxsize=None)
def _build() -> tuple[bool, str]:
    """Build (or load from the cache) and register the ops once per process: ``(ok, reason)``."""
    missing = [name for name in (*SOURCES, *HEADERS) if not (SOURCE_DIR / name).is_file()]
    if missing:
        return False, f"the C++ sources are missing ({', '.join(missing)} in {SOURCE_DIR})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"no C++ compiler: {compiler!r} is not on PATH (set CXX or install g++)"
    if shutil.which("ninja") is None:
        return False, "ninja is not installed (pip install ninja)"
    try:
        from torch.utils import cpp_extension

        directory = cache_directory()
        directory.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=LIBRARY, sources=[str(SOURCE_DIR / name) for name in SOURCES],
                           extra_include_paths=[str(SOURCE_DIR)], extra_cflags=list(CFLAGS),
                           extra_ldflags=list(LDFLAGS), build_directory=str(directory),
                           is_python_module=False, verbose=False)
    except Exception as error:  # a compiler error, a missing header, an unwritable cache...
        text = " ".join(str(error).split())
        return False, f"building csrc/ failed: {type(error).__name__}: {text[-600:]}"
    _register_fakes()
    return True, ""


def load() -> None:
    """Build or load the extension (once per process); raises ``NativeUnavailable`` saying why
    it cannot be used."""
    if disabled():
        raise NativeUnavailable(f"it is turned off by {ENABLE_ENV}=0")
    with _build_lock:  # one build at a time; later calls return the cached outcome
        ok, reason = _build()
    if not ok:
        raise NativeUnavailable(reason)
    global _loaded
    _loaded = True


def available() -> bool:
    """Whether the native engine can run here (building it on the first call)."""
    try:
        load()
    except NativeUnavailable:
        return False
    return True


def unavailable_reason() -> Optional[str]:
    """Why the native engine cannot run here, or None."""
    try:
        load()
    except NativeUnavailable as error:
        return str(error)
    return None


# ---- fake (meta) implementations, for torch.compile -------------------------------------------

def _register_fakes() -> None:
    def stats_dtype(*tensors):
        return compute_dtype(*(t.dtype for t in tensors))

    @torch.library.register_fake(f"{LIBRARY}::mixed_forward")
    def _(strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias, labels,
          lam, softcap, gap_threshold, ignore_index, token_block, vocab_block):
        n, dtype = labels.shape[0], stats_dtype(strong_hidden, weak_hidden)
        per_token = [labels.new_empty((n,), dtype=dtype) for _ in range(10)]
        return per_token + [labels.new_empty((n,), dtype=torch.bool)]

    @torch.library.register_fake(f"{LIBRARY}::mixed_forward_grads")
    def _(strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias, labels,
          lam, softcap, gap_threshold, ignore_index, requests, chunk, vocab_block):
        n, dtype = labels.shape[0], stats_dtype(strong_hidden, weak_hidden)
        per_token = [labels.new_empty((n,), dtype=dtype) for _ in range(10)]
        inputs = (strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias)
        grads = [labels.new_empty(t.shape if want else (0,), dtype=dtype)
                 for t, want in zip(inputs, requests)]
        return per_token + [labels.new_empty((n,), dtype=torch.bool)] + grads

    @torch.library.register_fake(f"{LIBRARY}::bf16_logits")
    def _(hidden, weight):
        return hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=torch.float32)

    @torch.library.register_fake(f"{LIBRARY}::single_stats")
    def _(hidden, weight, bias, labels, softcap, ignore_index, token_block, vocab_block):
        n, dtype = labels.shape[0], stats_dtype(hidden)
        return [labels.new_empty((n,), dtype=dtype) for _ in range(3)]

    @torch.library.register_fake(f"{LIBRARY}::mixed_backward")
    def _(strong_hidden, strong_weight, strong_bias, weak_hidden, weak_weight, weak_bias, labels,
          max_strong, logsum_strong, max_mix, logsum_mix, coef_mix, coef_strong, lam, softcap,
          requests, token_block, vocab_block):
        dtype = stats_dtype(strong_hidden, weak_hidden)
        out = []
        for index, (hidden, weight, bias) in enumerate(
                ((strong_hidden, strong_weight, strong_bias),
                 (weak_hidden, weak_weight, weak_bias))):
            wanted = requests[3 * index:3 * index + 3]
            bias_dtype = weight.dtype if bias is None else bias.dtype
            shapes = ((hidden.shape, dtype), (weight.shape, weight.dtype),
                      ((weight.shape[0],), bias_dtype))
            for want, (shape, grad_dtype) in zip(wanted, shapes):
                out.append(hidden.new_empty(shape if want else (0,),
                                            dtype=grad_dtype if want else dtype))
        return out


# ---- the engine ---------------------------------------------------------------------------------

class NativeEngine(FusedEngineBase):
    """The ``FusedEngine`` contract in the C++ extension of ``csrc/`` (CPU tensors only).

    Statistics and the ``dh`` accumulators are in the compute dtype; ``dW`` and ``db`` in the
    weight's dtype (see module doc).
    """

    supported_dtypes = FLOAT_DTYPES

    def __init__(self, token_block: int = TOKEN_BLOCK, vocab_block: int = VOCAB_BLOCK):
        if token_block < 1 or vocab_block < 1:
            raise ValueError("token_block and vocab_block must be positive")
        self.token_block, self.vocab_block = token_block, vocab_block

    def pinned(self) -> "NativeEngine":
        """A copy with this engine's block shape, so a backward blocks as its forward did."""
        return NativeEngine(self.token_block, self.vocab_block)

    @staticmethod
    def _ops():
        # A plain flag, not load()'s lock and cache, once loaded: torch.compile traces through it.
        if not _loaded:
            load()
        return torch.ops.wmss_native

    def mixed_forward(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                      spec: MixedLossSpec) -> MixedTokenStats:
        out = self._ops().mixed_forward(
            *strong, *weak, labels, float(spec.lam), _optional_float(spec.softcap),
            _optional_float(spec.gap_threshold), int(spec.ignore_index), self.token_block,
            self.vocab_block)
        return MixedTokenStats(*out)

    def mixed_forward_with_grads(self, strong: ModelInputs, weak: ModelInputs,
                                 labels: torch.Tensor, spec: MixedLossSpec,
                                 requests: tuple[GradRequest, GradRequest]
                                 ) -> tuple[MixedTokenStats, tuple[ModelGrads, ModelGrads]]:
        """Statistics and the unit-upstream gradients in one pass (contract: ``FusedEngine``'s
        optional ``mixed_forward_with_grads``): chunks of ``token_block`` tokens over the whole
        vocabulary, every gradient in the compute dtype."""
        wanted = [bool(flag) for request in requests for flag in request]
        out = self._ops().mixed_forward_grads(
            *strong, *weak, labels, float(spec.lam), _optional_float(spec.softcap),
            _optional_float(spec.gap_threshold), int(spec.ignore_index), wanted,
            self.token_block, self.vocab_block)
        count = len(MixedTokenStats._fields)
        grads = [grad if want else None for grad, want in zip(out[count:], wanted)]
        return MixedTokenStats(*out[:count]), (ModelGrads(*grads[:3]), ModelGrads(*grads[3:]))

    def single_stats(self, model: ModelInputs, labels: torch.Tensor, softcap: Optional[float],
                     ignore_index: int) -> SingleTokenStats:
        out = self._ops().single_stats(*model, labels, _optional_float(softcap),
                                       int(ignore_index), self.token_block, self.vocab_block)
        return SingleTokenStats(*out)

    def mixed_backward(self, strong: ModelInputs, weak: ModelInputs, labels: torch.Tensor,
                       lse: LogSumExps, coefficients: TokenCoefficients, spec: MixedLossSpec,
                       requests: tuple[GradRequest, GradRequest]) -> tuple[ModelGrads, ModelGrads]:
        """Gradients of ``sum_n c_n loss_n``; arguments as in ``TorchEngine.mixed_backward``."""
        wanted = [bool(flag) for request in requests for flag in request]
        out = self._ops().mixed_backward(
            *strong, *weak, labels, *lse, coefficients.mix, coefficients.strong,
            float(spec.lam), _optional_float(spec.softcap), wanted, self.token_block,
            self.vocab_block)
        grads = [grad if want else None for grad, want in zip(out, wanted)]
        return ModelGrads(*grads[:3]), ModelGrads(*grads[3:])


def _optional_float(value) -> Optional[float]:
    return None if value is None else float(value)
