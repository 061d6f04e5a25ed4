"""The native CPU engine (``csrc/``, ``backend="native"``): every result against the float64
truth, how ``"auto"`` chooses it, its fallback when it cannot be built, its memory bound and its
custom ops under ``torch.compile``."""

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import DEVICE, assert_close, make_inputs, relative_error
from oracle import truth
from test_fused_loss import (
    FLOAT64_PAIRS,
    LOW_PRECISION_STRONG_PAIRS,
    OPTIONS,
    PAIR_OPTIONS,
    SOFTCAPS,
    STAT_FIELDS,
    TOLERANCES,
    check_against_truth,
    run,
)

import wmss
from wmss.loss import engines
from wmss.loss.engines import native_engine
from wmss.loss.engines.contract import MixedLossSpec, ModelInputs

pytestmark = [
    pytest.mark.skipif(DEVICE.type != "cpu", reason="the native engine runs on CPUs"),
    pytest.mark.skipif(not native_engine.available(),
                       reason=f"native engine unavailable: {native_engine.unavailable_reason()}"),
]

# Blocks smaller than the test shapes (39 tokens, vocabulary 300) and dividing neither: several
# token and vocabulary blocks, the last ones partial, so statistics merge across blocks. 72
# vocabulary rows are a whole panel of the bf16 kernel (64) and part of another in every block.
SMALL_BLOCKS = {"token_block": 16, "vocab_block": 72}


@pytest.fixture(params=["default-blocks", "small-blocks"])
def blocks(request, monkeypatch):
    """Runs a test with the engine's own block shape, then with blocks smaller than its inputs."""
    if request.param == "small-blocks":
        for name, value in SMALL_BLOCKS.items():
            monkeypatch.setattr(engines.engine("native"), name, value)
    return request.param


# bf16 models take the AVX512-BF16 logit kernel where the CPU has it, float32 copies elsewhere:
# this "dtype" runs a bf16 test on the second path (WMSS_NATIVE_BF16=0).
BF16_AS_FLOAT32 = "bfloat16-as-float32"


def resolve_dtype(dtype, monkeypatch) -> torch.dtype:
    """A parametrized dtype as a torch dtype, turning the bf16 kernel off for BF16_AS_FLOAT32."""
    if dtype == BF16_AS_FLOAT32:
        monkeypatch.setenv(native_engine.BF16_KERNEL_ENV, "0")
        return torch.bfloat16
    return dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, BF16_AS_FLOAT32], ids=str)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_loss_gradients_and_stats_match_float64(options, dtype, blocks, monkeypatch):
    dtype = resolve_dtype(dtype, monkeypatch)
    options = dict(options)
    inputs, labels = make_inputs(dtype=dtype, bias=options.pop("bias", False))
    upstream = torch.rand(labels.shape)
    check_against_truth(inputs, labels, "native", dtype, upstream=upstream, **options)


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_float64_inputs_give_float64_accurate_results(options, blocks):
    options = dict(options)
    inputs, labels = make_inputs(dtype=torch.float64, bias=options.pop("bias", False))
    upstream = torch.rand(labels.shape, dtype=torch.float64)
    check_against_truth(inputs, labels, "native", torch.float64, upstream=upstream, **options)


def test_float16_matches_float64(blocks):
    inputs, labels = make_inputs(dtype=torch.float16, bias=True)
    check_against_truth(inputs, labels, "native", torch.float16, softcap=5.0,
                        gap_threshold=0.0)


@pytest.mark.parametrize("pair", [*FLOAT64_PAIRS.values(), *LOW_PRECISION_STRONG_PAIRS.values()],
                         ids=[*FLOAT64_PAIRS, *LOW_PRECISION_STRONG_PAIRS])
@pytest.mark.parametrize("options", list(PAIR_OPTIONS.values()), ids=list(PAIR_OPTIONS))
def test_a_pair_of_dtypes_is_as_accurate_as_each_model(pair, options, monkeypatch):
    """Each model keeps its own dtype (float64 for both when either is float64), each gradient
    at its own dtype's tolerance."""
    for name, value in SMALL_BLOCKS.items():
        monkeypatch.setattr(engines.engine("native"), name, value)
    strong_dtype, weak_dtype = pair
    inputs, labels = make_inputs(bias=True)
    inputs = {k: v.detach().to(strong_dtype if k.startswith("strong") else weak_dtype)
              for k, v in inputs.items()}
    lower = max(pair, key=lambda dtype: TOLERANCES[dtype])
    check_against_truth(inputs, labels, "native", lower, **options)


def test_extreme_logits_keep_float32_precision(blocks):
    """|z| ~ 1e4 from exactly representable inputs (see test_fused_loss.test_extreme_logits):
    peaked distributions and a large common offset, at float32's tolerance."""
    shape, vocab, d = (2, 19), 300, 40
    for offset in (0.0, 1.0e4):
        inputs = {
            "strong_hidden": torch.randint(-1, 2, (*shape, d)).float(),
            "strong_weight": torch.randint(-300, 301, (vocab, d)).float(),
            "weak_hidden": torch.randint(-1, 2, (*shape, d)).float(),
            "weak_weight": torch.randint(-3, 4, (vocab, d)).float(),
            "strong_bias": torch.full((vocab,), offset),
            "weak_bias": torch.full((vocab,), -offset),
        }
        labels = torch.randint(0, vocab, shape)
        labels[0, :3] = -100
        check_against_truth(inputs, labels, "native", torch.float32, lam=0.25)
        check_against_truth(inputs, labels, "native", torch.float32, lam=0.25,
                            gap_threshold=0.0)


def test_soft_capping_keeps_float32_precision_for_every_cap(blocks):
    inputs, labels = make_inputs(bias=True, logit_scale=6.0)
    for softcap in SOFTCAPS:
        check_against_truth(inputs, labels, "native", torch.float32, lam=0.3, softcap=softcap)
        check_against_truth(inputs, labels, "native", torch.float32, lam=0.3, softcap=softcap,
                            gap_threshold=0.0)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_lam_zero_and_one_are_each_models_cross_entropy(lam, blocks):
    inputs, labels = make_inputs(bias=True)
    check_against_truth(inputs, labels, "native", torch.float32, lam=lam, softcap=5.0)
    loss, stats, grads = run(inputs, labels, "native", lam=lam)
    model, other = ("strong", "weak") if lam == 1.0 else ("weak", "strong")
    supervised = labels != -100
    assert_close(stats.logprob_mix[supervised], getattr(stats, f"logprob_{model}")[supervised],
                 1e-6, "logprob_mix")
    for part in ("hidden", "weight", "bias"):
        assert grads[f"{other}_{part}"].abs().max() == 0, f"{other}_{part}"


@pytest.mark.parametrize("gap_threshold", [0.0, 0.05, math.inf, -math.inf])
def test_gap_masking_trains_each_token_with_its_loss(gap_threshold, blocks):
    inputs, labels = make_inputs(bias=True)
    check_against_truth(inputs, labels, "native", torch.float32, lam=0.4,
                        gap_threshold=gap_threshold)


def test_identical_models_at_gap_threshold_zero_mix_every_supervised_token():
    inputs, labels = make_inputs(d_weak=48, bias=True)
    for part in ("hidden", "weight", "bias"):
        inputs[f"weak_{part}"] = inputs[f"strong_{part}"].detach().clone().requires_grad_()
    _, stats, _ = run(inputs, labels, "native", lam=0.3, gap_threshold=0.0)
    assert torch.equal(stats.entropy_weak, stats.entropy_strong)  # the tie is exact
    assert torch.equal(stats.mixed, labels != -100)


def test_frozen_weak_model_gets_no_gradient(blocks):
    inputs, labels = make_inputs(bias=True)
    check_against_truth(inputs, labels, "native", torch.float32, lam=0.3, softcap=5.0,
                        gap_threshold=0.0, train_weak=False)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(reduction, blocks):
    inputs, labels = make_inputs(ignored=1.0, bias=True)
    loss, stats, grads = run(inputs, labels, "native", reduction=reduction, gap_threshold=0.1)
    assert torch.equal(loss, torch.zeros_like(loss))
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name
    for name in STAT_FIELDS:
        assert getattr(stats, name).abs().max() == 0, name
    assert not stats.mixed.any()


def test_an_empty_batch_gives_zero_and_zero_gradients():
    inputs, labels = make_inputs(shape=(0,), bias=True)
    loss, stats, grads = run(inputs, labels, "native")
    assert loss.item() == 0.0 and stats.mixed.shape == (0,)
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape and not grad.any(), name


def assert_only_requested_gradients(inputs, labels):
    """Three subsets of the inputs require a gradient in turn: each gets the float64 formula's,
    the others none (three forward-with-gradients calls)."""
    expected = truth(inputs, labels, softcap=5.0)
    count = (labels != -100).sum()
    for wanted in (["strong_hidden"], ["weak_weight", "strong_bias"], ["weak_bias"]):
        leaves = {k: v.detach().clone().requires_grad_(k in wanted) for k, v in inputs.items()}
        wmss.fused_loss(**leaves, labels=labels, backend="native", softcap=5.0).backward()
        for name, leaf in leaves.items():
            if name in wanted:
                assert_close(leaf.grad, expected.grads[name] / count, 1e-5, name)
            else:
                assert leaf.grad is None, name


def test_only_requested_gradients_are_computed():
    inputs, labels = make_inputs(bias=True)
    assert_only_requested_gradients(inputs, labels)


def test_sliced_and_transposed_inputs_give_the_results_of_contiguous_ones():
    inputs, labels = make_inputs(shape=(19,), vocab=70, d_strong=24, d_weak=16, bias=True)
    options = dict(lam=0.3, softcap=5.0, gap_threshold=0.0)
    contiguous, _, contiguous_grads = run(inputs, labels, "native", **options)
    views = {}
    for name, t in inputs.items():
        if name.endswith("hidden"):  # a column slice of wider rows
            wide = torch.zeros(t.shape[0], t.shape[1] + 8)
            wide[:, 3:3 + t.shape[1]] = t.detach()
            views[name] = wide[:, 3:3 + t.shape[1]]
        elif name.endswith("weight"):  # the transpose of a (d, V) tensor
            views[name] = t.detach().t().contiguous().t()
        else:  # every other element of a longer vector
            views[name] = torch.stack([t.detach(), torch.zeros_like(t)], dim=1)[:, 0]
        assert not views[name].is_contiguous(), name
    loss = wmss.fused_loss(**views, labels=labels, backend="native", **options)
    assert torch.equal(loss, contiguous)


@pytest.mark.parametrize("offset, extra", [(2, 8), (3, 8), (0, 9)],
                         ids=["even-stride", "odd-offset", "odd-stride"])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
def test_bf16_column_slices_give_the_results_of_contiguous_inputs(offset, extra, grad,
                                                                   monkeypatch):
    """bf16 hidden states and weights as column slices of wider rows, with 17 tokens and 33
    vocabulary rows in blocks of 16 (a last block of one row each): the bf16 kernel reads even
    strides in place and copies the others, giving the contiguous inputs' results."""
    for name in ("token_block", "vocab_block"):
        monkeypatch.setattr(engines.engine("native"), name, 16)
    inputs, labels = make_inputs(shape=(17,), vocab=33, d_strong=24, d_weak=16, bias=True,
                                 dtype=torch.bfloat16)
    options = dict(lam=0.3, softcap=5.0, gap_threshold=0.0)
    views = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    for name, t in inputs.items():
        if t.dim() == 2:
            wide = torch.zeros(t.shape[0], t.shape[1] + extra, dtype=t.dtype)
            wide[:, offset:offset + t.shape[1]] = t.detach()
            views[name] = wide[:, offset:offset + t.shape[1]].requires_grad_()
            assert not views[name].is_contiguous(), name
    if grad:  # (not through run(): its clone() would make the slices contiguous)
        want, _, want_grads = run(inputs, labels, "native", **options)
        got = wmss.fused_loss(**views, labels=labels, backend="native", **options)
        got.sum().backward()
        for name in want_grads:
            assert torch.equal(views[name].grad, want_grads[name]), name
    else:
        with torch.no_grad():
            want = wmss.fused_loss(**inputs, labels=labels, backend="native", **options)
            got = wmss.fused_loss(**views, labels=labels, backend="native", **options)
    assert torch.equal(got, want)


def test_results_are_deterministic():
    inputs, labels = make_inputs(bias=True)
    first, _, first_grads = run(inputs, labels, "native", gap_threshold=0.0, softcap=5.0)
    second, _, second_grads = run(inputs, labels, "native", gap_threshold=0.0, softcap=5.0)
    assert torch.equal(first, second)
    for name in first_grads:
        assert torch.equal(first_grads[name], second_grads[name]), name


# ---- the gradients computed in the forward (a training step: 6 products, not 8) -------------

def shared_upstream(labels, value=0.37):
    """One upstream gradient for every supervised token (what reductions "mean" and "sum" give)
    and, at ignored tokens, other values that must not matter."""
    upstream = torch.rand(labels.shape) + 1.0
    upstream[labels != -100] = value
    return upstream


class Calls:
    """Counts the native engine's calls of its forward-with-gradients and of its backward, and
    the gradients each backward call was asked for."""

    def __init__(self, monkeypatch):
        self.forward_with_grads, self.backward = 0, []
        cls = native_engine.NativeEngine
        with_grads, backward = cls.mixed_forward_with_grads, cls.mixed_backward

        def counted_with_grads(engine, *args, **kwargs):
            self.forward_with_grads += 1
            return with_grads(engine, *args, **kwargs)

        def counted_backward(engine, *args, **kwargs):
            self.backward.append(args[-1])
            return backward(engine, *args, **kwargs)

        monkeypatch.setattr(cls, "mixed_forward_with_grads", counted_with_grads)
        monkeypatch.setattr(cls, "mixed_backward", counted_backward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, BF16_AS_FLOAT32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_gradients_from_the_forward_match_float64(options, dtype, blocks, monkeypatch):
    """A shared upstream gradient: every gradient comes from the forward (the backward only
    scales), at each dtype's tolerance, for every option."""
    dtype = resolve_dtype(dtype, monkeypatch)
    calls = Calls(monkeypatch)
    options = dict(options)
    inputs, labels = make_inputs(dtype=dtype, bias=options.pop("bias", False))
    upstream = shared_upstream(labels).to(torch.float64 if dtype == torch.float64 else
                                          torch.float32)
    check_against_truth(inputs, labels, "native", dtype, upstream=upstream, **options)
    assert calls.forward_with_grads == 1 and calls.backward == []


def test_a_frozen_weak_model_and_a_few_trained_inputs_get_only_their_gradients(monkeypatch):
    calls = Calls(monkeypatch)
    inputs, labels = make_inputs(bias=True)
    check_against_truth(inputs, labels, "native", torch.float32, lam=0.3, softcap=5.0,
                        gap_threshold=0.0, train_weak=False, upstream=shared_upstream(labels))
    assert_only_requested_gradients(inputs, labels)
    assert calls.forward_with_grads == 4 and calls.backward == []


def test_per_token_upstream_gradients_recompute_only_the_weight_gradients(monkeypatch):
    """Different upstream gradients (reduction "none" and a weighted sum): dh still comes from
    the forward, dW and db from a recomputing backward asked for nothing else."""
    calls = Calls(monkeypatch)
    inputs, labels = make_inputs(bias=True)
    check_against_truth(inputs, labels, "native", torch.float32, lam=0.3, softcap=5.0,
                        gap_threshold=0.0, upstream=torch.rand(labels.shape))
    assert calls.forward_with_grads == 1
    assert [[list(request) for request in requests] for requests in calls.backward] == [
        [[False, True, True], [False, True, True]]]


@pytest.mark.parametrize("when", ["no_grad", "inputs-without-grad", "stats-only"])
def test_no_gradient_work_when_no_gradient_is_needed(when, monkeypatch):
    calls = Calls(monkeypatch)
    inputs, labels = make_inputs(bias=True)
    leaves = {k: v.detach() for k, v in inputs.items()}
    want, _, _ = run(inputs, labels, "native", lam=0.3)
    calls.forward_with_grads = 0
    if when == "no_grad":
        with torch.no_grad():
            loss = wmss.fused_loss(**inputs, labels=labels, backend="native", lam=0.3)
    elif when == "inputs-without-grad":
        loss = wmss.fused_loss(**leaves, labels=labels, backend="native", lam=0.3)
    else:
        loss = wmss.token_entropy(inputs["strong_hidden"], inputs["strong_weight"],
                                  backend="native")
    assert calls.forward_with_grads == 0 and not loss.requires_grad
    if when != "stats-only":
        assert torch.equal(loss, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_retained_graph_gives_the_same_gradients_twice(dtype):
    """The first backward scales the forward's gradients in place; a second one through the
    retained graph recomputes them (every gradient: the only recomputing backward that is asked
    for dh) rather than scaling them again."""
    inputs, labels = make_inputs(bias=True, dtype=dtype)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    loss = wmss.fused_loss(**leaves, labels=labels, backend="native", gap_threshold=0.0)
    loss.backward(retain_graph=True)
    first = {k: v.grad.clone() for k, v in leaves.items()}
    loss.backward()
    # bf16: the second set comes from float32 products, the first from bf16 ones.
    tol = 1e-6 if dtype == torch.float32 else TOLERANCES[dtype]
    for name, leaf in leaves.items():
        assert_close(leaf.grad, 2 * first[name], tol, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, BF16_AS_FLOAT32], ids=str)
def test_half_precision_gradients_are_as_accurate_as_their_dtype(dtype, monkeypatch):
    """As test_fused_loss's test for the other fused backends: each gradient within 2.5x the
    error of the exact gradient rounded once to the input dtype, up to 2^16 items."""
    dtype = resolve_dtype(dtype, monkeypatch)
    inputs, labels = make_inputs(shape=(4, 37), vocab=1000, d_strong=72, d_weak=40, dtype=dtype,
                                 bias=True, ignored=0.1)
    count = int((labels != -100).sum())
    for num_items in (None, 2**16):
        denominator = count if num_items is None else num_items
        upstream = torch.full(labels.shape, 1.0 / denominator, dtype=torch.float64)
        expected = truth(inputs, labels, upstream=upstream)
        _, _, grads = run(inputs, labels, "native", num_items_in_batch=num_items)
        for name, grad in grads.items():
            want = expected.grads[name]
            rounding = float((want.to(dtype).double() - want).norm() / want.norm())
            assert relative_error(grad, want) <= 2.5 * rounding, (num_items, name)


# ---- the bf16 logit kernel (csrc/bf16_gemm.h) -------------------------------------------------

def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in info)
    except OSError:
        return False


def test_the_bf16_kernel_is_built_where_the_cpu_has_avx512_bf16(monkeypatch):
    """So that on such a CPU (this project's machines) the bf16 tests of the engine run through
    it; elsewhere bf16 models take the float32 products."""
    monkeypatch.delenv(native_engine.BF16_KERNEL_ENV, raising=False)
    assert torch.ops.wmss_native.bf16_kernel_available() == cpu_has_avx512_bf16()


needs_bf16_kernel = pytest.mark.skipif(not cpu_has_avx512_bf16(),
                                       reason="the bf16 kernel needs AVX512-BF16")


@needs_bf16_kernel
@pytest.mark.parametrize("m, d, v", [
    (1, 1, 1),        # a single pair, half of it padding
    (7, 5, 70),       # d odd (a padded pair), a partial micro tile of rows and of columns
    (13, 48, 64),     # one whole panel
    (20, 1100, 130),  # d past one slice of k (512): the slices' sums add up
    (6, 2, 0),        # no columns: an empty result
])
def test_bf16_kernel_logits_are_float32_accurate(m, d, v):
    """h W^T with float32 accumulation: every logit within 1e-6 of sum_k |h_k W_k| of its
    exact value (a bf16-rounded logit would be off by ~4e-3 of it; a dropped pair or column by
    far more)."""
    hidden = torch.randn(m, d).bfloat16()
    weight = torch.randn(v, d).bfloat16()
    got = torch.ops.wmss_native.bf16_logits(hidden, weight)
    assert got.dtype == torch.float32 and got.shape == (m, v)
    exact = hidden.double() @ weight.double().t()
    scale = hidden.double().abs() @ weight.double().abs().t()
    assert ((got.double() - exact).abs() <= 1e-6 * scale).all()


@needs_bf16_kernel
@pytest.mark.parametrize("layout", ["row-slice", "odd-offset", "one-odd-row", "every-other",
                                    "transposed"])
def test_bf16_kernel_reads_strided_operands_as_contiguous_ones(layout):
    """Read in place where the bf16 pairs can be viewed as int32 (even row stride and offset),
    copied otherwise."""
    base_h, base_w = torch.randn(10, 40).bfloat16(), torch.randn(35, 40).bfloat16()
    hidden, weight = {
        "row-slice": (base_h[:, :34], base_w[:, :34]),       # even row stride 40, in place
        "odd-offset": (base_h[1:, 1:35], base_w[2:, 3:37]),  # odd storage offsets
        "one-odd-row": (torch.randn(3, 9).bfloat16()[1:2, :8],
                        torch.randn(5, 9).bfloat16()[:, :8]),  # odd row stride 9
        "every-other": (base_h[:, ::2], base_w[:, ::2]),     # column stride 2
        "transposed": (base_h[:, :33], torch.randn(33, 70).bfloat16().t()),
    }[layout]
    got = torch.ops.wmss_native.bf16_logits(hidden, weight)
    assert torch.equal(got, torch.ops.wmss_native.bf16_logits(hidden.contiguous(),
                                                               weight.contiguous()))
    exact = hidden.double() @ weight.double().t()
    assert relative_error(got, exact) < 1e-6


@needs_bf16_kernel
def test_wmss_native_bf16_0_turns_the_bf16_kernel_off(monkeypatch):
    """The float32-copy path the CPUs without the kernel take: other rounding of the logits
    (another summation order), so other last bits of the loss, and as accurate (the accuracy
    tests run both: BF16_AS_FLOAT32)."""
    monkeypatch.delenv(native_engine.BF16_KERNEL_ENV, raising=False)
    # d 520: sums of bf16 products that float32 must round (for d ~ 50 they are often exact,
    # and then both paths give the same bits).
    inputs, labels = make_inputs(dtype=torch.bfloat16, bias=True, d_strong=520, d_weak=520)
    with_kernel, _, _ = run(inputs, labels, "native", lam=0.3, reduction="none")
    monkeypatch.setenv(native_engine.BF16_KERNEL_ENV, "0")
    assert not torch.ops.wmss_native.bf16_kernel_available()
    without, _, _ = run(inputs, labels, "native", lam=0.3, reduction="none")
    assert not torch.equal(with_kernel, without)
    assert_close(with_kernel, without, 1e-5, "loss")


@needs_bf16_kernel
def test_bf16_kernel_names_wrong_inputs():
    with pytest.raises(RuntimeError, match="bfloat16 hidden and weight, got Float"):
        torch.ops.wmss_native.bf16_logits(torch.randn(2, 4), torch.randn(3, 4).bfloat16())
    for d_hidden, d_weight in ((4, 5), (0, 0)):
        with pytest.raises(RuntimeError, match=r"hidden \[M, d\] and weight \[V, d\] with d > 0"):
            torch.ops.wmss_native.bf16_logits(torch.randn(2, d_hidden).bfloat16(),
                                              torch.randn(3, d_weight).bfloat16())


@pytest.mark.parametrize("d", [1, 33, 515], ids=lambda d: f"d{d}")
def test_bf16_models_of_odd_hidden_size_match_float64(d, blocks):
    """The kernel pads an odd hidden size by one zero (and walks 515 in two slices of k): loss,
    statistics and gradients (from the forward, and from a recomputing backward) as accurate as
    with an even one."""
    inputs, labels = make_inputs(dtype=torch.bfloat16, d_strong=d, d_weak=d + 2, bias=True)
    check_against_truth(inputs, labels, "native", torch.bfloat16, lam=0.3, softcap=5.0,
                        gap_threshold=0.0, upstream=shared_upstream(labels))
    check_against_truth(inputs, labels, "native", torch.bfloat16, lam=0.3,
                        upstream=torch.rand(labels.shape))


# ---- token_entropy --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, BF16_AS_FLOAT32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_entropy_matches_float64(dtype, softcap, blocks, monkeypatch):
    dtype = resolve_dtype(dtype, monkeypatch)
    inputs, labels = make_inputs(dtype=dtype, bias=True)
    expected = truth(inputs, labels, softcap=softcap)
    hidden, weight, bias = (inputs[f"strong_{part}"] for part in ("hidden", "weight", "bias"))
    got = wmss.token_entropy(hidden, weight, labels, bias=bias, softcap=softcap, backend="native")
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == out_dtype and got.shape == labels.shape
    tol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    assert_close(got.reshape(-1), expected.entropy_strong, tol, "entropy", atol=atol)
    # Without labels every position is scored.
    everything = wmss.token_entropy(hidden, weight, bias=bias, softcap=softcap, backend="native")
    unlabelled = truth(inputs, torch.zeros_like(labels), softcap=softcap)
    assert_close(everything.reshape(-1), unlabelled.entropy_strong, tol, "all", atol=atol)


# ---- choosing the engine, and not having it --------------------------------------------------

def test_auto_picks_native_on_cpu_and_matches_torch():
    assert engines.resolve("auto", torch.device("cpu"),
                           [("strong_hidden", torch.float32)]) == "native"
    inputs, labels = make_inputs(bias=True)
    native, _, native_grads = run(inputs, labels, "auto", softcap=5.0, gap_threshold=0.0)
    torch_loss, _, torch_grads = run(inputs, labels, "torch", softcap=5.0, gap_threshold=0.0)
    assert_close(native, torch_loss, 1e-6, "loss")
    for name in native_grads:
        assert_close(native_grads[name], torch_grads[name], 1e-5, name)


def test_wmss_native_0_turns_the_engine_off(monkeypatch):
    monkeypatch.setenv(native_engine.ENABLE_ENV, "0")
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turned off on purpose: no warning
        assert engines.resolve("auto", cpu) == "torch"
    inputs, labels = make_inputs()
    with pytest.raises(ValueError, match=r"backend='native' cannot run: .*WMSS_NATIVE=0"):
        wmss.fused_loss(**inputs, labels=labels, backend="native")


def test_a_failed_build_warns_once_and_auto_uses_torch(monkeypatch):
    reason = "building csrc/ failed: no compiler here"
    monkeypatch.setattr(native_engine, "_build", lambda: (False, reason))
    monkeypatch.setattr(engines, "_warned_native", False)
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="native CPU engine is unavailable .*no compiler"):
        assert engines.resolve("auto", cpu) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        assert engines.resolve("auto", cpu) == "torch"
    inputs, labels = make_inputs()
    with pytest.raises(ValueError, match=r"backend='native' cannot run: .*no compiler here"):
        wmss.fused_loss(**inputs, labels=labels, backend="native")
    with pytest.raises(ValueError, match=r"backend='native' cannot run: .*no compiler"):
        wmss.token_entropy(inputs["strong_hidden"], inputs["strong_weight"], backend="native")


def test_a_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-wmss")
    reason = native_engine._build.__wrapped__()[1]
    assert "no C++ compiler" in reason and "no-such-compiler-wmss" in reason


def test_the_cache_directory_can_be_chosen(monkeypatch, tmp_path):
    monkeypatch.setenv(native_engine.CACHE_ENV, str(tmp_path / "here"))
    assert native_engine.cache_directory() == tmp_path / "here"
    monkeypatch.delenv(native_engine.CACHE_ENV)
    default = native_engine.cache_directory()
    assert default.name.startswith("native-") and default.parent.name == "wmss"


# ---- the custom ops under torch.compile ------------------------------------------------------

def test_the_forward_op_compiles_and_matches_eager():
    """``torch.compile`` traces the op through its fake implementation (no graph break
    needed) and the compiled forward returns what eager returns."""
    inputs, labels = make_inputs(bias=True)
    strong = ModelInputs(*(inputs.get(f"strong_{p}") for p in ("hidden", "weight", "bias")))
    weak = ModelInputs(*(inputs.get(f"weak_{p}") for p in ("hidden", "weight", "bias")))
    strong, weak = (m.map(lambda t: t.detach().reshape(-1, t.shape[-1]) if t.dim() > 1
                          else t.detach()) for m in (strong, weak))
    flat = labels.reshape(-1)
    spec = MixedLossSpec(lam=0.3, softcap=5.0, gap_threshold=0.0, ignore_index=-100)
    native = engines.engine("native")

    def forward(strong_hidden, weak_hidden):
        stats = native.mixed_forward(strong._replace(hidden=strong_hidden),
                                     weak._replace(hidden=weak_hidden), flat, spec)
        return stats.loss.sum() * 2.0, stats.entropy_strong + 1.0

    eager = forward(strong.hidden, weak.hidden)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)(strong.hidden, weak.hidden)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=False, backend="aot_eager")
    got = compiled(strong.hidden, weak.hidden)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
    fake_checked = torch.library.opcheck(
        torch.ops.wmss_native.mixed_forward.default,
        (*strong, *weak, flat, 0.3, 5.0, 0.0, -100, 16, 64),
        test_utils=("test_schema", "test_faketensor"))
    assert all(result == "SUCCESS" for result in fake_checked.values()), fake_checked


def test_the_pair_ops_name_what_is_wrong_with_their_arguments():
    """The checks every op on the pair makes before any work (the autograd layer never sends
    these; a direct caller gets the argument named)."""
    inputs, labels = make_inputs()
    flat = labels.reshape(-1)
    s = [inputs["strong_hidden"].detach().reshape(-1, 48), inputs["strong_weight"].detach(), None]
    w = [inputs["weak_hidden"].detach().reshape(-1, 40), inputs["weak_weight"].detach(), None]
    forward_grads = torch.ops.wmss_native.mixed_forward_grads
    with pytest.raises(RuntimeError, match="requests holds .hidden, weight, bias. for each model"):
        forward_grads(*s, *w, flat, 0.3, None, None, -100, [True] * 5, 16, 64)
    with pytest.raises(RuntimeError, match="a bias gradient was requested for a model without"):
        forward_grads(*s, *w, flat, 0.3, None, None, -100, [False, False, True] + [False] * 3,
                      16, 64)
    with pytest.raises(RuntimeError, match="token_block and vocab_block must be positive"):
        torch.ops.wmss_native.mixed_forward(*s, *w, flat, 0.3, None, None, -100, 0, 64)
    stats = torch.ops.wmss_native.mixed_forward(*s, *w, flat, 0.3, None, None, -100, 16, 64)
    coefficients = (torch.rand(flat.shape), None)
    with pytest.raises(RuntimeError, match="a bias gradient was requested for a model without"):
        torch.ops.wmss_native.mixed_backward(*s, *w, flat, *stats[1:5], *coefficients, 0.3, None,
                                             [False] * 5 + [True], 16, 64)


def test_the_backward_and_entropy_ops_have_matching_fake_implementations():
    inputs, labels = make_inputs(bias=True, dtype=torch.bfloat16)
    flat = labels.reshape(-1)
    s = [inputs[f"strong_{p}"].detach() for p in ("hidden", "weight", "bias")]
    w = [inputs[f"weak_{p}"].detach() for p in ("hidden", "weight", "bias")]
    s[0], w[0] = s[0].reshape(-1, s[0].shape[-1]), w[0].reshape(-1, w[0].shape[-1])
    stats = torch.ops.wmss_native.mixed_forward(*s, *w, flat, 0.3, None, 0.0, -100, 16, 64)
    coefficients = (torch.rand(flat.shape), torch.rand(flat.shape))
    for requests in ([True] * 6, [True, False, True, False, True, False]):
        args = (*s, *w, flat, *stats[1:5], *coefficients, 0.3, None, requests, 16, 64)
        checked = torch.library.opcheck(torch.ops.wmss_native.mixed_backward.default, args,
                                        test_utils=("test_schema", "test_faketensor"))
        assert all(result == "SUCCESS" for result in checked.values()), checked
    for requests in ([True] * 6, [True, False, True, False, True, False]):
        args = (*s, *w, flat, 0.3, 5.0, 0.0, -100, requests, 16, 64)
        checked = torch.library.opcheck(torch.ops.wmss_native.mixed_forward_grads.default, args,
                                        test_utils=("test_schema", "test_faketensor"))
        assert all(result == "SUCCESS" for result in checked.values()), checked
    checked = torch.library.opcheck(torch.ops.wmss_native.single_stats.default,
                                    (*s, flat, 3.0, -100, 16, 64),
                                    test_utils=("test_schema", "test_faketensor"))
    assert all(result == "SUCCESS" for result in checked.values()), checked


# ---- memory ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_native_backend_rss_growth_is_a_small_fraction_of_the_logits():
    """The torch engine's bound (tests/test_memory.py), measured the same way: a few blocks,
    the gradients and O(N) statistics, under 10% of one [N, V] float32 tensor."""
    from test_memory import LOGITS_BYTES, peak_rss_growth

    fused = peak_rss_growth("native")
    assert fused["growth"] < 0.10 * LOGITS_BYTES, fused
    naive = peak_rss_growth("reference")
    assert naive["growth"] > LOGITS_BYTES, naive
    assert abs(fused["loss"] - naive["loss"]) < 1e-4 * abs(naive["loss"])


_STEP_PROBE = textwrap.dedent("""
    import json, sys, torch, wmss
    torch.manual_seed(0)
    n, v, d = (int(a) for a in sys.argv[1:4])
    dtype = getattr(torch, sys.argv[4])
    # Made in place: no freed temporary under the high-water mark that the step could reuse.
    leaf = lambda *s: torch.randn(*s, dtype=dtype).mul_(0.5).requires_grad_()
    inputs = dict(strong_hidden=leaf(n, d), strong_weight=leaf(v, d),
                  weak_hidden=leaf(n, d), weak_weight=leaf(v, d))
    labels = torch.randint(0, v, (n,))
    # Warm-up on a slice: loads the extension and ATen's lazily made state outside the window.
    small = {k: t[:8].detach().requires_grad_() for k, t in inputs.items()}
    wmss.fused_loss(**small, labels=labels[:8] % 8, backend="native").backward()
    # From the resident set now to the high-water mark after the step. The mark is reset to the
    # resident set first (Linux: "5" to clear_refs), so that no earlier peak (an import's or a
    # build's temporaries, freed since) counts as the step's.
    def vm(field):
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = vm("VmRSS")
    wmss.fused_loss(**inputs, labels=labels, backend="native", gap_threshold=0.0).backward()
    print(json.dumps(dict(growth=vm("VmHWM") - before)))
""")


def step_growth(dtype: str, n: int, v: int, d: int) -> int:
    out = subprocess.run([sys.executable, "-c", _STEP_PROBE, str(n), str(v), str(d), dtype],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.slow
def test_a_training_step_holds_one_set_of_gradients_and_two_logit_chunks():
    """The forward-with-gradients bound (native_engine's module doc), at a shape where the
    weight gradients dominate: the unit-upstream gradients, which the backward scales in place
    and returns (no second set, no zero-filled output gradients), two [token_block, V] float32
    logit chunks in the forward, and 16 MiB for the allocator and MKL. (No [N, V] either:
    test_native_backend_rss_growth_is_a_small_fraction_of_the_logits.)"""
    n, v, d = 512, 16384, 512
    growth = step_growth("float32", n, v, d)
    gradients = 2 * (v * d + n * d) * 4
    chunks = 2 * native_engine.TOKEN_BLOCK * v * 4
    bound = gradients + chunks + 16 * 2**20
    assert gradients < growth < bound, (growth / 2**20, bound / 2**20)


@needs_bf16_kernel
@pytest.mark.slow
def test_a_bf16_training_step_copies_no_weight_to_float32():
    """bf16 models: the float32 accumulators of the gradients and the bf16 gradients returned,
    the two float32 chunks, and the bf16 kernel's packed copy of each weight (the weight's own
    bytes), never a float32 copy of a weight (twice that: 189-193 MiB here before the kernel,
    against this bound of 179 MiB)."""
    n, v, d = 512, 16384, 512
    growth = step_growth("bfloat16", n, v, d)
    accumulators = 2 * (v * d + n * d) * 4
    returned = 2 * (v * d + n * d) * 2
    packed = 2 * v * d * 2
    chunks = 2 * native_engine.TOKEN_BLOCK * v * 4
    bound = accumulators + returned + packed + chunks + 16 * 2**20
    assert accumulators < growth < bound, (growth / 2**20, bound / 2**20)
