"""Compile gate: build every production kernel configuration for real GPUs, on any machine.

    python -m wmss_kernels.compile_check [--arch sm_90 sm_80 ...] [--json FILE]
        [--dtypes bf16 fp16 fp32] [--sources triton cublas] [--kernels NAME ...]
        [--tiles BLOCK_N BLOCK_V BLOCK_D WARPS STAGES ...] [--jobs N]

Every kernel configuration the launchers can produce (each kernel x bf16/fp16/fp32 x the tiles,
warps and stages ``config`` chooses x the constexpr variants: soft-capping, bias, gap masking,
frozen weak model, shared or separate gradient buffers, both logit sources, IEEE or TF32 float32
dots) goes through Triton's real compiler and ptxas for the named architectures. No GPU is
needed: Triton compiles for a ``GPUTarget`` without a device. One row per build: kernel, arch,
dtype, config, shared bytes, registers, spills, whether wgmma is used. The exit status is 1 when a
build exceeds the architecture's shared memory, spills registers, fails to compile, or (a kernel
with a ``tl.dot``, bf16, on sm_90) does not use wgmma.

How the configurations are found, without hard-coding any kernel signature:

1. **Record.** The real launchers (``mixed_token_stats``, ``single_token_stats``,
   ``mixed_ce_backward``, ``logit_stats.logit_token_stats``) run on small CPU tensors of each
   variant inside ``config.compile_target(arch)`` (tiles, warps and splits are planned as on that
   GPU) while ``JITFunction.run`` is replaced by a recorder: each ``kernel[grid](...)`` launch is
   turned into the signature, constexprs and attributes (16-byte alignment, Triton's ``== 1``
   integer specialization) a real launch of the same arguments would compile, through Triton's
   own binder. The cuBLAS products between launches are skipped (their results are never read).
2. **Deduplicate** launches by (kernel, signature, constexprs, attributes, options).
3. **Compile** each unique build in a process pool (``triton.compile`` of an ``ASTSource`` for
   ``GPUTarget("cuda", arch, 32)``), reading shared memory from the kernel's metadata, registers
   and spills from the ptxas log of that very compile (``ptxas -v`` is re-run on the PTX only if
   no log came back), wgmma from the PTX and ``tl.dot`` from the TTIR.

Limits: integer arguments are specialized as for the recording's shapes (``TOKENS`` not a
multiple of 16, hidden size and vocabulary multiples of 16); other shapes may give other
specializations of the same kernel (alike in resources). Strong and weak models of different
dtypes are not built. The numbers are those of the installed Triton and its ptxas: a GPU image
with another Triton version compiles other code. Exit status 2: bad arguments, or no build left
by the filters.

Python API: ``check(archs)`` runs the gate; ``check_tiles(tiles, archs)`` builds the ``"triton"``
logit source kernels with explicit ``Tiles`` (the launchers' ``tiles=`` override), e.g. to prove
that the tiles a test uses are legal on a GPU. Both return ``BuildRow``s, and both work under
``TRITON_INTERPRET=1`` (as in the test suite) by running the gate in a subprocess without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from . import config
from wmss.loss.engines.contract import (
    GradRequest,
    MixedLossSpec,
    ModelInputs,
    TokenCoefficients,
)

# Shared memory one block may use, in bytes (CUDA programming guide, "Technical Specifications").
SHARED_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                 100: 227 * 1024, 120: 99 * 1024}
DEFAULT_ARCHS = (90, 80)
# Builds that must use Hopper's warpgroup MMA: bf16 kernels with a tl.dot, on these archs.
WGMMA_ARCHS = (90,)
WGMMA_DTYPES = ("bf16",)
WGMMA_MARK = "wgmma.mma_async"
DOT_MARK = "tt.dot"
WARP_SIZE = 32

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Triton's names of the element types the launchers pass pointers to.
_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                  torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                  torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_ALIGNMENT = 16  # bytes (pointers) or divisor (integers) of Triton's tt.divisibility attribute
_DIVISIBILITY = [["tt.divisibility", _ALIGNMENT]]

# Shapes the launchers are driven with. Only what a shape does to the launch matters (the compiled
# code does not depend on sizes): the plan (vocabulary splits, logit blocks, gradient pieces) and,
# through divisibility by 16, Triton's specialization of integer arguments. TOKENS is B * (S - 1)
# after Hugging Face's label shift: several token tiles, not a multiple of 16. HIDDEN is a multiple
# of 16 (as every lm head's), not of the tiles' block_d; VOCAB a multiple of 16, not of the tiles.
TOKENS = 500
HIDDEN = 80
VOCAB = 4000
IGNORE_INDEX = -100
SOFTCAP = 30.0  # Gemma 2's final-logit cap
# While recording, the "cublas" forward may hold logit blocks of this many bytes (instead of
# config.STATS_LOGIT_BYTES): it then cuts VOCAB into several blocks and merges them, as it does
# production vocabularies, without a vocabulary of 10^5 and the CPU work on [TOKENS, 10^5] blocks
# that the launchers do between kernels (bias-gradient sums). Block widths stay multiples of the
# tiles, so the kernels see arguments of the same divisibility.
RECORDING_LOGIT_BYTES = TOKENS * 4 * VOCAB // 3


# ----------------------------------------------------------------------------------------------
# Variants: the ways the launchers can be called.


@dataclass(frozen=True)
class Variant:
    """One way the model code calls the launchers; each gives one set of kernel launches.

    ``dtype``: of both models' hidden states and weights ("bf16", "fp16", "fp32"). ``source``: the
    logit source. ``two_models``: the mixed loss (forward and backward) or ``single_token_stats``
    (forward only). ``gap``: gap masking; ``train_weak=False``: the weak model is frozen. Without
    soft-capping and gap masking, with both models trained, the backward shares one gradient
    buffer. ``tf32``: float32 dots where PyTorch allows TF32 for CUDA matmuls. ``lam``: the
    mixing weight (1 is plain strong cross-entropy, which launchers may treat apart).
    """

    dtype: str
    source: str = "triton"
    two_models: bool = True
    bias: bool = False
    softcap: bool = False
    gap: bool = False
    train_weak: bool = True
    tf32: bool = False
    lam: float = 0.5

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.source not in config.LOGIT_SOURCES:
            raise ValueError(f"source must be one of {config.LOGIT_SOURCES}, got {self.source!r}")


# Mixing weights the variants use: the paper's mixture, then the ends of [0, 1] (plain strong
# cross-entropy, and the weak model's logits alone), where a launcher may skip a model's terms.
LAMS = (0.5, 1.0, 0.0)


def production_variants(dtypes: Iterable[str] = tuple(DTYPES),
                        sources: Iterable[str] = config.LOGIT_SOURCES) -> list[Variant]:
    """Every variant the model code can make, for these dtypes and logit sources.

    TF32 only for float32 (bf16/fp16 dots ignore the precision). Strong and weak models of
    different dtypes are not covered (each dtype's kernels are built on their own).
    """
    variants = []
    flags = (False, True)
    for dtype, source in itertools.product(dtypes, sources):
        for tf32 in flags if dtype == "fp32" else (False,):
            for bias, softcap in itertools.product(flags, flags):
                variants.append(Variant(dtype, source, False, bias, softcap, tf32=tf32))
                for gap, train_weak, lam in itertools.product(flags, flags, LAMS):
                    variants.append(Variant(dtype, source, True, bias, softcap, gap, train_weak,
                                            tf32, lam))
    return variants


# ----------------------------------------------------------------------------------------------
# Recording launches.


@dataclass(frozen=True)
class Build:
    """One compilation: what ``triton.compile`` needs, in picklable form, plus the report's keys.

    ``constexprs`` and ``attrs`` are keyed by argument-index paths, as ``ASTSource`` takes them.
    """

    module: str
    kernel: str
    arch: int
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[tuple[int, ...], object], ...]
    attrs: tuple[tuple[tuple[int, ...], tuple[tuple[str, int], ...]], ...]
    options: tuple[tuple[str, object], ...]

    def describe(self) -> str:
        """A short human description: constexprs (True flags by name, False ones omitted, others
        as NAME=value), then warps and stages."""
        names = [name for name, _ in self.signature]
        parts = []
        for path, value in self.constexprs:
            name = names[path[0]]
            if value is True:
                parts.append(name)
            elif value is not False and value is not None:
                parts.append(f"{name}={value}")
        options = dict(self.options)
        for key, label in (("num_warps", "warps"), ("num_stages", "stages")):
            if key in options:
                parts.append(f"{label}={options[key]}")
        return " ".join(parts)


def _freeze(value):
    """Nested lists/dicts as tuples (hashable, comparable)."""
    if isinstance(value, dict):
        return tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _is_constexpr_param(param) -> bool:
    return "constexpr" in str(param.annotation)


def _launch_options(fn, kwargs: dict) -> dict:
    """Keyword arguments of a launch that are compile options (num_warps, ...), not parameters."""
    names = set(fn.arg_names)
    return {k: v for k, v in kwargs.items() if k not in names}


def _triton_specialization(fn, backend, args, kwargs):
    """(signature, constexprs, attrs) exactly as ``JITFunction.run`` would compile this launch,
    through Triton's own binder (internal API, present in Triton 3.2 to 3.9)."""
    key = (id(fn), id(backend))
    if key not in _BINDERS:
        from triton.runtime.jit import create_function_from_signature
        _BINDERS[key] = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = _BINDERS[key](*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                     options)
    return signature, constexprs, attrs


def _own_specialization(fn, args, kwargs):
    """The same as ``_triton_specialization`` from public information only (the fallback):
    Triton's rules for plain arguments (pointers and integers divisible by 16 get
    ``tt.divisibility``; integers equal to 1 and None become constexprs)."""
    import inspect

    params = inspect.signature(fn.fn).parameters
    bound = inspect.signature(fn.fn).bind(
        *args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, value) in enumerate(bound.arguments.items()):
        path = (index,)
        if _is_constexpr_param(params[name]) or value is None or (
                type(value) is int and value == 1):
            signature[name] = "constexpr"
            constexprs[path] = value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _POINTER_TYPES[value.dtype]
            aligned = value.data_ptr() % _ALIGNMENT == 0
        elif isinstance(value, bool):
            signature[name], aligned = "u1", False
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else (
                "i64" if -2**63 <= value < 2**63 else "u64")
            aligned = value % _ALIGNMENT == 0
        elif isinstance(value, float):
            signature[name], aligned = "fp32", False
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
        if aligned:
            attrs[path] = _DIVISIBILITY
    return signature, constexprs, attrs


def specialize(fn, arch: int, args, kwargs, *, own: bool = False) -> Build:
    """The ``Build`` a launch ``fn[grid](*args, **kwargs)`` compiles for ``arch``.

    Triton's binder when available (``own=False``), else ``_own_specialization``. Attributes
    are normalised (empty entries dropped) so that both give equal builds.
    """
    signature = constexprs = attrs = None
    if not own:
        try:
            signature, constexprs, attrs = _triton_specialization(
                fn, _backend(arch), args, kwargs)
        except (ImportError, AttributeError, TypeError):  # Triton's internals moved
            signature = None
    if signature is None:
        signature, constexprs, attrs = _own_specialization(fn, args, kwargs)
    return Build(
        module=fn.module if hasattr(fn, "module") else fn.fn.__module__, kernel=fn.__name__,
        arch=arch, signature=tuple(signature.items()),
        constexprs=tuple(sorted((tuple(k), _freeze(v)) for k, v in constexprs.items())),
        attrs=tuple(sorted((tuple(k), _freeze(v)) for k, v in attrs.items() if v)),
        options=tuple(sorted(_launch_options(fn, kwargs).items())))


_BACKENDS: dict = {}
_BINDERS: dict = {}


def _backend(arch: int):
    if arch not in _BACKENDS:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        _BACKENDS[arch] = make_backend(GPUTarget("cuda", arch, WARP_SIZE))
    return _BACKENDS[arch]


@contextlib.contextmanager
def recording(arch: int, sink: list, *, own: bool = False) -> Iterator[None]:
    """Within this block, kernel launches are not run but appended to ``sink`` as ``Build``s for
    ``arch``, launches are planned for ``arch`` (``config.compile_target``), the cuBLAS
    products of ``wmss_kernels.products`` do nothing and the "cublas" forward's logit blocks are
    ``RECORDING_LOGIT_BYTES``."""
    from triton.runtime.jit import JITFunction

    if config.is_interpreting():  # launches would go to the interpreter, not to JITFunction.run
        raise RuntimeError("recording launches needs TRITON_INTERPRET unset")

    def record_launch(fn, *args, grid, warmup=False, **kwargs):
        sink.append(specialize(fn, arch, args, kwargs, own=own))

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(JITFunction, "run", record_launch))
        stack.enter_context(_patched(config, "STATS_LOGIT_BYTES", RECORDING_LOGIT_BYTES))
        for module, name in _product_functions():
            stack.enter_context(_patched(module, name, _skip_product))
        stack.enter_context(config.compile_target(arch))
        yield


@contextlib.contextmanager
def _patched(owner, name: str, value) -> Iterator[None]:
    """``owner.name = value`` within the block (a class's own attribute, or any object's)."""
    missing = object()
    previous = vars(owner).get(name, missing) if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if previous is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)


def _skip_product(*args, **kwargs) -> None:
    """Stands in for a cuBLAS product while recording: its result is never read."""


def _product_functions() -> list:
    """(module, name) of every binding of a ``wmss_kernels.products`` function in the kernel
    modules (the products module itself and the launchers that imported them)."""
    from . import fused_stats, logit_grad, products

    functions = {id(f) for name, f in vars(products).items() if not name.startswith("_")
                 and callable(f) and getattr(f, "__module__", None) == products.__name__}
    return [(module, name) for module in (products, fused_stats, logit_grad)
            for name, value in vars(module).items() if id(value) in functions]


@contextlib.contextmanager
def _matmul_precision(tf32: bool) -> Iterator[None]:
    """Allow TF32 for CUDA float32 matmuls (``tf32``) or not, as a user would, within the block
    (``torch.backends.cuda.matmul.fp32_precision`` where PyTorch has it, 2.9+)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        with _patched(matmul, "fp32_precision", "tf32" if tf32 else "ieee"):
            yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@dataclass(frozen=True)
class _Inputs:
    """The launchers' inputs for one dtype: plausible values (the kernels never run, but a
    launcher may look at its inputs), shared by every variant of the dtype."""

    strong: ModelInputs
    weak: ModelInputs
    labels: torch.Tensor  # in [0, VOCAB), every fourth position ignored (-100)
    coef_mix: torch.Tensor  # the mean's upstream gradient on even positions ("mixed")
    coef_strong: torch.Tensor  # and on odd ones (plain strong CE under gap masking)


@functools.lru_cache(maxsize=None)
def _inputs(dtype: torch.dtype) -> _Inputs:
    generator = torch.Generator().manual_seed(0)

    def head():
        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=generator) * scale).to(dtype)
        return ModelInputs(randn(TOKENS, HIDDEN), randn(VOCAB, HIDDEN, scale=HIDDEN ** -0.5),
                           randn(VOCAB))

    positions = torch.arange(TOKENS)
    labels = torch.where(positions % 4 == 3, IGNORE_INDEX, positions * 7 % VOCAB)
    upstream = (labels != IGNORE_INDEX).float() / TOKENS
    even = positions % 2 == 0
    return _Inputs(head(), head(), labels, torch.where(even, upstream, 0.0),
                   torch.where(even, 0.0, upstream))


def drive(variant: Variant, tiles: Optional[config.Tiles] = None) -> None:
    """Call the launchers as the model code does for ``variant`` (CPU tensors): the forward,
    and for two models the backward (its forward statistics are garbage: no kernel runs); for
    one model with the ``"triton"`` source also ``logit_stats`` (with and without labels).
    ``tiles``: the launchers' override."""
    from . import mixed_ce_backward, mixed_token_stats, single_token_stats
    from .logit_stats import logit_token_stats

    inputs = _inputs(DTYPES[variant.dtype])
    strong, weak = (model if variant.bias else model._replace(bias=None)
                    for model in (inputs.strong, inputs.weak))
    spec = MixedLossSpec(lam=variant.lam, softcap=SOFTCAP if variant.softcap else None,
                         gap_threshold=0.0 if variant.gap else None, ignore_index=IGNORE_INDEX)
    options = dict(tiles=tiles, logit_source=variant.source)
    with _matmul_precision(variant.tf32):
        if not variant.two_models:
            single_token_stats(strong, inputs.labels, softcap=spec.softcap,
                               ignore_index=IGNORE_INDEX, **options)
            if variant.source == "triton":  # logit_stats computes its tiles whatever the source
                for labels in (inputs.labels, None):  # with targets, and every position scored
                    logit_token_stats(strong, labels, softcap=spec.softcap,
                                      ignore_index=IGNORE_INDEX, tiles=tiles)
            return
        stats = mixed_token_stats(strong, weak, inputs.labels, spec, **options)
        trained = GradRequest(True, True, variant.bias)
        frozen = GradRequest(False, False, False)
        coefficients = TokenCoefficients(inputs.coef_mix,
                                         inputs.coef_strong if variant.gap else None)
        mixed_ce_backward(strong, weak, inputs.labels, stats.log_sum_exps, coefficients, spec,
                          (trained, frozen if not variant.train_weak else trained), **options)


def record(arch: int, variants: Sequence[Variant],
           tiles: Sequence[Optional[config.Tiles]] = (None,)) -> dict[Build, list[str]]:
    """Unique builds of every launch of ``variants`` (with each of ``tiles``) for ``arch``,
    each with the dtypes (in first-seen order) whose launches compile it."""
    builds: dict[Build, list[str]] = {}
    for variant, tile in itertools.product(variants, tiles):
        sink: list[Build] = []
        try:
            with recording(arch, sink):
                drive(variant, tile)
        except Exception as error:
            raise RuntimeError(f"recording {variant} with tiles {tile} for {arch_name(arch)} "
                               f"failed: {error}") from error
        for build in sink:
            dtypes = builds.setdefault(build, [])
            if variant.dtype not in dtypes:
                dtypes.append(variant.dtype)
    return builds


# ----------------------------------------------------------------------------------------------
# Compiling.


@dataclass(frozen=True)
class Usage:
    """What one compiled build uses; ``error`` when it did not compile. ``seconds``: the
    compilation's wall time."""

    shared_bytes: Optional[int] = None
    registers: Optional[int] = None
    spills: Optional[int] = None
    wgmma: bool = False
    has_dot: bool = False
    error: Optional[str] = None
    seconds: float = 0.0


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# Triton 3.9 warns once per process that its default for TRITON_DEFAULT_FP_FUSION will change;
# the gate builds with the default, whatever it is, as a real launch does.
_QUIET_WARNING = "TRITON_DEFAULT_FP_FUSION"


def parse_ptxas_log(log: str) -> Optional[tuple[int, int]]:
    """(registers, spilled bytes: spill stores + spill loads) from ``ptxas -v`` output; None if
    the log has no register line."""
    registers = _REGISTERS.search(log)
    if registers is None:
        return None
    spills = sum(int(store) + int(load) for store, load in _SPILLS.findall(log))
    return int(registers.group(1)), spills


def run_ptxas(ptx: str, arch: int) -> str:
    """``ptxas -v`` on ``ptx`` for ``arch`` with the ptxas Triton uses; returns its log."""
    from triton.backends.nvidia import compiler as nvidia

    if hasattr(nvidia, "get_ptxas"):
        ptxas = nvidia.get_ptxas(arch).path
    else:
        ptxas = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    gpu = nvidia.sm_arch_from_capability(arch)
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", source, "-o",
                               os.path.join(folder, "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def compile_build(build: Build) -> Usage:
    """Compile ``build`` with Triton for its architecture (no device needed) and measure it.

    Registers and spills come from the ptxas log of this compilation when Triton prints it
    (``TRITON_DUMP_PTXAS_LOG=1`` and no cache hit, as in the gate's workers), else from running
    ``run_ptxas`` on its PTX.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    started = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(build.module), build.kernel)
        source = ASTSource(fn=fn, signature=dict(build.signature),
                           constexprs=dict(build.constexprs),
                           attrs={path: [list(a) for a in attrs] for path, attrs in build.attrs})
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(source, target=GPUTarget("cuda", build.arch, WARP_SIZE),
                                    options=dict(build.options))
        ptx = kernel.asm["ptx"]
        usage = parse_ptxas_log(log.getvalue()) or parse_ptxas_log(run_ptxas(ptx, build.arch))
        if usage is None:
            raise RuntimeError("ptxas reported no register count")
        registers, spills = usage
        return Usage(shared_bytes=int(kernel.metadata.shared), registers=registers,
                     spills=spills, wgmma=WGMMA_MARK in ptx,
                     has_dot=DOT_MARK in kernel.asm["ttir"],
                     seconds=time.perf_counter() - started)
    except Exception as error:  # reported as a failed build, not a crash of the gate
        lines = f"{type(error).__name__}: {error}".strip().splitlines()
        return Usage(error=lines[0][:500], seconds=time.perf_counter() - started)


def _init_worker(cache_dir: str) -> None:
    """A compile worker: a private Triton cache (every build compiles afresh, so its ptxas log
    comes back), ptxas logs printed, compiled rather than interpreted kernels."""
    import warnings

    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message=f".*{_QUIET_WARNING}")


@contextlib.contextmanager
def compile_pool(jobs: Optional[int] = None) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``jobs`` compile workers (all CPUs by default) for ``compile_build``."""
    import multiprocessing

    jobs = max(1, jobs or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="wmss-compile-check-") as cache_dir:
        # spawn, not fork: the parent has run torch (and its thread pools).
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(cache_dir,)) as pool:
            yield pool


# ----------------------------------------------------------------------------------------------
# Rows and the gate.


@dataclass(frozen=True)
class BuildRow:
    """One build's report. ``config``: ``Build.describe``; ``spills``: bytes of spill stores plus
    loads; ``problems``: why it is not ok (empty when ok)."""

    kernel: str
    arch: str
    dtype: str
    config: str
    shared_bytes: Optional[int]
    registers: Optional[int]
    spills: Optional[int]
    wgmma: bool
    ok: bool
    problems: tuple[str, ...] = ()

    JSON_FIELDS = ("kernel", "arch", "dtype", "config", "shared_bytes", "registers", "spills",
                   "wgmma", "ok")

    def as_json(self) -> dict:
        """The row as written by ``--json``."""
        return {name: getattr(self, name) for name in self.JSON_FIELDS}


def arch_name(arch: int) -> str:
    return f"sm_{arch}"


def parse_arch(text: str) -> int:
    """``"sm_90"``, ``"sm_90a"`` or ``"90"`` -> 90; only architectures of ``SHARED_LIMITS``."""
    match = re.fullmatch(r"(?:sm_)?(\d+)a?", text.strip().lower())
    if match is None or int(match.group(1)) not in SHARED_LIMITS:
        known = ", ".join(arch_name(a) for a in SHARED_LIMITS)
        raise ValueError(f"unknown architecture {text!r} (known: {known})")
    return int(match.group(1))


def problems(arch: int, dtype: str, usage: Usage) -> tuple[str, ...]:
    """Why a build of ``dtype`` for ``arch`` with this ``usage`` is not acceptable."""
    if usage.error is not None:
        return (f"does not compile: {usage.error}",)
    found = []
    limit = SHARED_LIMITS[arch]
    if usage.shared_bytes > limit:
        found.append(f"shared memory {usage.shared_bytes} B > {limit} B")
    if usage.spills:
        found.append(f"spills {usage.spills} B of registers")
    if usage.has_dot and arch in WGMMA_ARCHS and dtype in WGMMA_DTYPES and not usage.wgmma:
        found.append("no wgmma")
    return tuple(found)


def _row(build: Build, dtype: str, usage: Usage) -> BuildRow:
    found = problems(build.arch, dtype, usage)
    return BuildRow(kernel=build.kernel, arch=arch_name(build.arch), dtype=dtype,
                    config=build.describe(), shared_bytes=usage.shared_bytes,
                    registers=usage.registers, spills=usage.spills, wgmma=usage.wgmma,
                    ok=not found, problems=found)


def _argument_specs(build: Build) -> dict[str, str]:
    """Each plain argument's type, with "/16" where Triton assumes 16-divisibility."""
    aligned = {path[0] for path, _ in build.attrs}
    return {name: kind + ("/16" if index in aligned else "")
            for index, (name, kind) in enumerate(build.signature) if kind != "constexpr"}


def _distinguish(rows: list[BuildRow], builds: list[Build]) -> list[BuildRow]:
    """Rows whose (arch, dtype, kernel, config) coincide (builds that differ only in argument
    types or alignment) get the arguments that tell them apart appended to their config."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.arch, row.dtype, row.kernel, row.config), []).append(i)
    rows = list(rows)
    for members in groups.values():
        if len(members) < 2:
            continue
        specs = [_argument_specs(builds[i]) for i in members]
        names = sorted({name for spec in specs for name in spec
                        if len({other.get(name) for other in specs}) > 1})
        for i, spec in zip(members, specs):
            extra = " ".join(f"{name}:{spec.get(name, '-')}" for name in names)
            rows[i] = dataclasses.replace(rows[i], config=f"{rows[i].config} {extra}")
    return rows


def _gate(archs: Sequence[int], variants: Sequence[Variant],
          tiles: Sequence[Optional[config.Tiles]], kernels: Optional[Sequence[str]],
          jobs: Optional[int]) -> list[BuildRow]:
    """Record, deduplicate and compile; one row per (build, dtype), sorted by architecture (in
    the order given), dtype, kernel and config. Each architecture's builds start compiling while
    the next one is recorded."""
    if config.is_interpreting():
        return _gate_in_subprocess(archs, variants, tiles, kernels, jobs)
    pending = []
    with compile_pool(jobs) as pool:
        for arch in archs:
            for build, dtypes in record(arch, variants, tiles).items():
                if kernels is None or build.kernel in kernels:
                    pending.append((build, dtypes, pool.submit(compile_build, build)))
        built = [(build, dtype, future.result()) for build, dtypes, future in pending
                 for dtype in dtypes]
    rows = _distinguish([_row(*entry) for entry in built], [build for build, _, _ in built])
    order = {name: i for i, name in enumerate(arch_name(a) for a in archs)}
    dtype_order = {name: i for i, name in enumerate(DTYPES)}
    return sorted(rows, key=lambda r: (order[r.arch], dtype_order[r.dtype], r.kernel, r.config))


def check(archs: Sequence[int | str] = DEFAULT_ARCHS, *,
          variants: Optional[Sequence[Variant]] = None, kernels: Optional[Sequence[str]] = None,
          jobs: Optional[int] = None) -> list[BuildRow]:
    """The compile gate: rows of every build of ``variants`` (``production_variants()`` by
    default) with the tiles ``config`` chooses, for each architecture (90 or "sm_90").
    ``kernels``: only builds of these kernel names. ``jobs``: compile processes."""
    return _gate([parse_arch(str(a)) for a in archs],
                 production_variants() if variants is None else variants, (None,), kernels, jobs)


def check_tiles(tiles: Sequence[config.Tiles], archs: Sequence[int | str] = DEFAULT_ARCHS, *,
                dtypes: Iterable[str] = tuple(DTYPES), variants: Optional[Sequence[Variant]] = None,
                kernels: Optional[Sequence[str]] = None,
                jobs: Optional[int] = None) -> list[BuildRow]:
    """Rows of the builds the launchers make with each of ``tiles`` (their ``tiles=`` override),
    which applies to the ``"triton"`` logit source: its variants of ``dtypes`` by default."""
    if variants is None:
        variants = production_variants(dtypes, sources=("triton",))
    return _gate([parse_arch(str(a)) for a in archs], variants, list(tiles), kernels, jobs)


# The subprocess that runs the gate when this process runs Triton's interpreter (its kernels are
# interpreter functions and cannot be compiled): request and rows travel as JSON files.


def _gate_in_subprocess(archs, variants, tiles, kernels, jobs) -> list[BuildRow]:
    request = {"archs": list(archs), "variants": [dataclasses.asdict(v) for v in variants],
               "tiles": [None if t is None else dataclasses.asdict(t) for t in tiles],
               "kernels": None if kernels is None else list(kernels), "jobs": jobs}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="wmss-compile-check-") as folder:
        request_path, rows_path = os.path.join(folder, "request.json"), os.path.join(folder,
                                                                                     "rows.json")
        with open(request_path, "w") as f:
            json.dump(request, f)
        done = subprocess.run([sys.executable, "-m", __name__, "--request", request_path,
                               "--rows", rows_path], env=env, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(rows_path):
            raise RuntimeError(f"compile check subprocess failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}")
        with open(rows_path) as f:
            rows = json.load(f)
    return [BuildRow(**{**row, "problems": tuple(row["problems"])}) for row in rows]


def _serve_request(request_path: str, rows_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    rows = _gate(request["archs"], [Variant(**v) for v in request["variants"]],
                 [None if t is None else config.Tiles(**t) for t in request["tiles"]],
                 request["kernels"], request["jobs"])
    _write_json(rows_path, [dataclasses.asdict(row) for row in rows])


# ----------------------------------------------------------------------------------------------
# Command line.


def _write_json(path: str, payload) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file in the same folder, renamed)."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".compile_check.", suffix=".json")
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def format_table(rows: Sequence[BuildRow]) -> str:
    """The rows as an aligned text table (shared memory in KiB)."""
    header = ("kernel", "arch", "dtype", "shared KiB", "regs", "spills", "wgmma", "ok", "config")
    lines = [header]
    for row in rows:
        shared = "-" if row.shared_bytes is None else f"{row.shared_bytes / 1024:.1f}"
        lines.append((row.kernel, row.arch, row.dtype, shared, str(row.registers or "-"),
                      "-" if row.spills is None else str(row.spills),
                      "yes" if row.wgmma else "no", "ok" if row.ok else "FAIL", row.config))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join([cell.ljust(w) for cell, w in zip(line, widths)] + [line[-1]])
                     for line in lines)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m wmss_kernels.compile_check",
        description="Compile every production kernel configuration for the named GPU "
                    "architectures (no GPU needed) and fail on shared-memory overflow, register "
                    "spills or, for bf16 on sm_90, missing wgmma.")
    parser.add_argument("--arch", nargs="+", default=[arch_name(a) for a in DEFAULT_ARCHS],
                        help="target architectures (default: sm_90 sm_80)")
    parser.add_argument("--json", metavar="FILE", help="write the rows to FILE as a JSON list")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=tuple(DTYPES),
                        help="dtypes of the models (default: all)")
    parser.add_argument("--sources", nargs="+", choices=config.LOGIT_SOURCES,
                        default=config.LOGIT_SOURCES, help="logit sources (default: both)")
    parser.add_argument("--kernels", nargs="+", metavar="NAME",
                        help="only builds of these kernels (e.g. _stats_partials_kernel)")
    parser.add_argument("--tiles", nargs=5, type=int, action="append",
                        metavar=("BLOCK_N", "BLOCK_V", "BLOCK_D", "WARPS", "STAGES"),
                        help="build the 'triton' source kernels with these tiles instead of "
                             "config's (repeatable)")
    parser.add_argument("--jobs", type=int, help="compile processes (default: all CPUs)")
    parser.add_argument("--request", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (1 if any build is not ok)."""
    import warnings

    warnings.filterwarnings("ignore", message=f".*{_QUIET_WARNING}")
    args = _parse_args(argv)
    if args.request:
        _serve_request(args.request, args.rows)
        return 0
    if config.is_interpreting():
        print("compile_check: unset TRITON_INTERPRET (kernels must be compiled, not interpreted)",
              file=sys.stderr)
        return 2
    try:
        archs = [parse_arch(a) for a in args.arch]
    except ValueError as error:
        print(f"compile_check: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.tiles:
        tiles = [config.Tiles(*t[:3], num_warps=t[3], num_stages=t[4]) for t in args.tiles]
        variants = production_variants(args.dtypes, sources=("triton",))
    else:
        tiles, variants = [None], production_variants(args.dtypes, args.sources)
    rows = _gate(archs, variants, tiles, args.kernels, args.jobs)
    if not rows:
        print("compile_check: no build matches (see --kernels, --dtypes, --sources)",
              file=sys.stderr)
        return 2
    print(format_table(rows))
    failed = [row for row in rows if not row.ok]
    for row in failed:
        print(f"FAIL {row.kernel} {row.arch} {row.dtype} [{row.config}]: "
              f"{'; '.join(row.problems)}")
    if args.json:
        _write_json(args.json, [row.as_json() for row in rows])
    print(f"{len(rows)} rows for {', '.join(arch_name(a) for a in archs)}: {len(failed)} not ok "
          f"({time.perf_counter() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
