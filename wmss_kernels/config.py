"""Tile shapes, launch settings and memory budgets of the Triton kernels, kept in one place.

Every number that shapes a launch lives here so that tuning on a new GPU touches one file. The
values are starting points chosen for Hopper (H100/H200): 64x128 logit tiles fed by 64-wide slices
of the hidden dimension keep the tensor cores busy while two fp32 accumulator tiles (strong and
weak) still fit in registers at eight warps.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass(frozen=True)
class Tiles:
    """One kernel's tile shape and launch settings.

    block_n: tokens per tile; block_v: vocabulary entries per tile; block_d: hidden-dimension slice
    fed to each ``tl.dot``. All three must be powers of two and at least 16 (``tl.dot``'s minimum).
    """

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


# Tile tables, per architecture family and operand precision, chosen with the compile gate
# (``python -m wmss_kernels.compile_check``, ptxas of triton 3.9): for every kernel the largest
# tiles tried that build for every constexpr variant with no register spill and, for half
# precision on Hopper, wgmma. What was tried and what it cost is in benchmarks/NOTES.md (v4).
#   "stats": forward statistics (two logit tiles live at once);
#   "grad": backward with two logit tiles (soft-capping, gap masking, both models trained apart);
#   "mixed_grad": backward of the paper's loss with the mixture in one accumulator (half only).
# Float32 dots run on FMA units (IEEE) or TF32 tensor cores, with operands in registers: smaller
# tiles. Under TRITON_INTERPRET=1 (arch None) the Hopper tiles are used, so the CPU tests run the
# very shapes a GPU builds.
HOPPER, AMPERE = 90, 80
_TILES = {
    HOPPER: {
        ("stats", "half"): Tiles(64, 128, 32, num_warps=8, num_stages=3),
        ("grad", "half"): Tiles(64, 128, 32, num_warps=8, num_stages=3),
        ("mixed_grad", "half"): Tiles(128, 128, 64, num_warps=8, num_stages=3),
        ("stats", "fp32"): Tiles(64, 64, 16, num_warps=8, num_stages=3),
        ("grad", "fp32"): Tiles(32, 64, 16, num_warps=4, num_stages=3),
    },
    AMPERE: {
        ("stats", "half"): Tiles(64, 64, 32, num_warps=8, num_stages=3),
        ("grad", "half"): Tiles(64, 128, 32, num_warps=8, num_stages=3),
        ("mixed_grad", "half"): Tiles(64, 128, 32, num_warps=8, num_stages=3),
        ("stats", "fp32"): Tiles(64, 64, 32, num_warps=8, num_stages=3),
        ("grad", "fp32"): Tiles(64, 64, 16, num_warps=8, num_stages=3),
    },
}


def _table(arch: Optional[int]) -> dict:
    """The tile table of ``arch``'s family: Hopper's for sm_90 and later and for the
    interpreter (None), Ampere's below."""
    return _TILES[HOPPER if arch is None or arch >= HOPPER else AMPERE]


def _precision(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


# Operand dtypes for which the backward of the paper's loss builds the mixed logits in a single
# accumulator (``logit_tiles.mixed_logits_tile``), which allows tiles twice as large. Its rounding
# differs from the forward's ``lam z_s + (1 - lam) z_w`` by ~1e-7 |z|: far below bf16/fp16 logit
# gradients' own rounding, but at |z| ~ 1e4 it would cost float32 its 1e-5 accuracy, so float32
# keeps the two-accumulator kernel, which forms the mixture exactly as the forward does.
SINGLE_ACCUMULATOR_DTYPES = (torch.bfloat16, torch.float16)


def stats_tiles(dtype: torch.dtype, arch: Optional[int]) -> Tiles:
    """Tiles of the forward statistics kernel for operands of ``dtype`` on ``arch``
    (``device_arch``; None: the interpreter)."""
    return _table(arch)[("stats", _precision(dtype))]


def grad_tiles(dtype: torch.dtype, arch: Optional[int], single_accumulator: bool) -> Tiles:
    """Tiles of the backward logit-gradient kernels; ``single_accumulator``: the mixed logits in
    one accumulator (``_mixed_grad_kernel``: no soft-capping, no gap masking, half precision)."""
    precision = _precision(dtype)
    kind = "mixed_grad" if single_accumulator and precision == "half" else "grad"
    return _table(arch)[(kind, precision)]


def loaded_tiles(arch: Optional[int]) -> Tiles:
    """Tiles of the kernels that read cuBLAS-written float32 logit blocks."""
    return LOADED_TILES

# Where the kernels get logit tiles from. "triton": each kernel computes its tiles with tl.dot from
# the hidden states and weights (no logits in memory). "cublas": cuBLAS writes float32 logit
# blocks [tokens, block] to memory and the kernels read them (every product at cuBLAS speed, for
# one write and one read of each block). Which is faster depends on how close tl.dot comes to
# cuBLAS on the GPU at hand (benchmarks/NOTES.md); WMSS_LOGIT_SOURCE overrides the default, and
# assigning LOGIT_SOURCE at run time takes effect at the next call.
LOGIT_SOURCES = ("triton", "cublas")
LOGIT_SOURCE = os.environ.get("WMSS_LOGIT_SOURCE", "triton")
# "cublas" source, forward: bytes of float32 logit blocks held at once (both models together).
STATS_LOGIT_BYTES = 256 * 2**20
# Kernels that read logit blocks from memory (no dot products, so block_d is unused): rows per
# program and columns per step. Their tiles of 64-bit pointers cost registers: 16x128 and 16x256
# spill in the two-model soft-capped variants (compile gate, triton 3.6 and 3.9); 16x64 does not.
LOADED_TILES = Tiles(block_n=16, block_v=64, block_d=16, num_warps=4, num_stages=2)

# Hidden-state bytes (both models' rows) that a group of token tiles keeps in L2 while the
# vocabulary sweeps past it (``logit_tiles.grouped_tile``): a third of H100's 50 MB L2 (A100:
# 40 MB), leaving room for the weight tiles streaming through and the outputs.
L2_GROUP_BYTES = 16 * 2**20


def token_tiles_per_group(block_n: int, hidden_row_bytes: int) -> int:
    """Token tiles per L2 group, for hidden rows of ``hidden_row_bytes`` (both models')."""
    return max(1, L2_GROUP_BYTES // max(block_n * hidden_row_bytes, 1))


# Token tiles per combine program (the combine of split-vocabulary partials is elementwise).
COMBINE_BLOCK_N = 128

# Aim for this many programs per streaming multiprocessor when splitting the vocabulary of the
# forward statistics across programs (more splits: more parallelism, more partials to combine).
STATS_PROGRAMS_PER_SM = 2
# Upper bound on vocabulary splits (partials are [num_stats, splits, tokens] float32), and on
# the partials' bytes (many tokens need few splits to fill the GPU anyway).
MAX_VOCAB_SPLITS = 64
MAX_PARTIALS_BYTES = 256 * 2**20

# The backward materialises the logit gradient of one (token chunk x vocabulary block) at a time,
# in the compute dtype (one buffer shared by both models for the paper's loss, one per trained
# model otherwise), and hands it to cuBLAS for the gradient products. The buffers may take this
# fraction of the bytes of the gradients being computed (the memory target of issue 6 is the
# gradients plus 10%), within the absolute bounds below.
GRAD_BUFFER_FRACTION = 0.08
GRAD_BUFFER_MIN_BYTES = 32 * 2**20
GRAD_BUFFER_MAX_BYTES = 1024 * 2**20
# Vocabulary blocks narrower than this make the weight-gradient product [block, d] too small to
# fill the GPU; below it the backward cuts the tokens into chunks instead (and accumulates dW).
MIN_GRAD_VOCAB_BLOCK = 1024

# Finite stand-in for -inf on masked vocabulary columns: exp() of it underflows to exactly 0 and,
# unlike -inf, multiplying it by 0 gives 0 (not NaN) in the online entropy sum.
MASKED_LOGIT = -1.0e30


def is_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_dot_operands() -> bool:
    """Whether kernels must cast ``tl.dot`` operands to float32 before the product.

    Triton's interpreter multiplies bfloat16 operands as raw bit patterns (triton issue #11584), so
    under the interpreter every dot is done in float32; on a GPU the tensor cores take bf16 as is.
    """
    return is_interpreting()


def round_bf16_by_hand() -> bool:
    """Whether kernels must round float32 to bfloat16 themselves before a store.

    Triton's interpreter converts float32 to bfloat16 by truncation (GPUs round to nearest even),
    which would double the rounding error of every bf16 logit gradient in the CPU tests.
    """
    return is_interpreting()


def dot_precision() -> str:
    """``tl.dot`` input precision for float32 operands, following PyTorch's setting for CUDA
    matmuls: "tf32" where PyTorch allows TF32 for them (as cuBLAS then uses it), else "ieee".

    Reads ``torch.backends.cuda.matmul.fp32_precision`` ("none" defers to the global
    ``torch.backends.fp32_precision``) where PyTorch has it (2.9+): the legacy
    ``torch.get_float32_matmul_precision()`` raises once the new API has been used.
    ``set_float32_matmul_precision("high")`` is reflected there too. bf16/fp16 operands ignore it.
    """
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:  # PyTorch < 2.9
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if matmul == "none":
        matmul = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if matmul == "tf32" else "ieee"


# Streaming multiprocessors of the architectures the compile gate targets (H100 SXM, A100), used
# for launch decisions when compiling for an architecture without its device.
SM_COUNTS = {90: 132, 80: 108}

# Set by ``compile_target`` (the compile gate): the architecture launches are planned for.
_compile_target: Optional[int] = None


@contextlib.contextmanager
def compile_target(arch: int) -> Iterator[None]:
    """Plan every launch in this block for compute capability ``arch`` (e.g. 90 for sm_90), with
    or without such a device: tiles, warps and splits are chosen as they would be there."""
    global _compile_target
    previous, _compile_target = _compile_target, arch
    try:
        yield
    finally:
        _compile_target = previous


def device_arch(device: torch.device) -> Optional[int]:
    """Compute capability of ``device`` as ``10 * major + minor`` (90 for H100); the
    ``compile_target`` when one is set; None for the interpreter and non-CUDA devices."""
    if _compile_target is not None:
        return _compile_target
    if is_interpreting() or device.type != "cuda":
        return None
    major, minor = _capability(device.index if device.index is not None else 0)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def multiprocessor_count(device: torch.device) -> int:
    """Number of SMs of ``device``; that of the ``compile_target``; 1 under the interpreter."""
    if _compile_target is not None:
        return SM_COUNTS.get(_compile_target, 132)
    if is_interpreting() or device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else 0)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def logit_source(override: Optional[str] = None) -> str:
    """``override`` if given, else the current ``LOGIT_SOURCE``; checked."""
    source = LOGIT_SOURCE if override is None else override
    if source not in LOGIT_SOURCES:
        raise ValueError(f"logit source (wmss_kernels.config.LOGIT_SOURCE, WMSS_LOGIT_SOURCE) must "
                         f"be one of {LOGIT_SOURCES}, got {source!r}")
    return source
