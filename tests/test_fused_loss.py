"""wmss.fused_loss: the loss, every gradient and every statistic against the float64 truth."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BACKENDS,
    DEVICE,
    FAST_BACKENDS,
    TOLERANCE,
    TRITON_AVAILABLE,
    assert_close,
    make_inputs,
    relative_error,
)
from oracle import GapDecisions, truth

import wmss

STAT_FIELDS = ("entropy_strong", "entropy_weak", "logprob_strong", "logprob_weak", "logprob_mix")
# Statistics can be ~0 everywhere (near one-hot distributions); float32 resolves ~1e-7 of them.
STAT_ATOL = 1e-6
# float64 inputs are computed in float64 throughout (backends "torch" and "reference").
FLOAT64_TOLERANCE = 1e-12
TOLERANCES = {**TOLERANCE, torch.float64: FLOAT64_TOLERANCE}

OPTIONS = {
    "paper": dict(),
    "lam-bias-softcap": dict(lam=0.2, softcap=4.0, bias=True),
    "gap-masking": dict(lam=0.7, gap_threshold=0.05),
    "everything": dict(lam=0.35, softcap=6.0, bias=True, gap_threshold=0.0),
}


def run(inputs, labels, backend, **options):
    """fused_loss on fresh copies of the leaves; returns (loss, stats, grads by name)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    loss, stats = wmss.fused_loss(**leaves, labels=labels, backend=backend, return_stats=True,
                                  **options)
    if loss.requires_grad:
        loss.sum().backward()
    return loss, stats, {k: v.grad for k, v in leaves.items()}


def result_dtype(inputs) -> torch.dtype:
    """The loss and statistics are float64 when either model's inputs are, else float32."""
    float64 = any(v.dtype == torch.float64 for v in inputs.values())
    return torch.float64 if float64 else torch.float32


def check_against_truth(inputs, labels, backend, dtype, upstream=None, **options):
    """Per-token loss, statistics and every gradient against float64 of the inputs as given.

    Each gradient is held to the tolerance of its own leaf's dtype (a float32 weak model's
    gradients at float32 precision beside a bfloat16 strong model); the loss and statistics,
    computed in float32 (float64) from the inputs as given, to their own dtype's. ``dtype``: the
    least precise dtype among the inputs, for the statistics' absolute floor."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    loss, stats = wmss.fused_loss(**leaves, labels=labels, backend=backend, return_stats=True,
                                  reduction="none", **options)
    expected = truth(inputs, labels, upstream=upstream,
                     decisions=GapDecisions(stats.mixed, stats.entropy_strong, stats.entropy_weak),
                     **{k: options[k] for k in ("lam", "softcap", "gap_threshold", "train_weak",
                                                "ignore_index") if k in options})
    out_dtype = result_dtype(inputs)
    assert loss.dtype == out_dtype and loss.shape == labels.shape
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.to(out_dtype))
    tol = TOLERANCES[out_dtype]
    atol = STAT_ATOL if dtype != torch.float64 else FLOAT64_TOLERANCE
    assert_close(loss.reshape(-1), expected.loss, tol, "per-token loss")
    for name in STAT_FIELDS:
        got = getattr(stats, name)
        assert got.dtype == out_dtype and got.shape == labels.shape
        assert_close(got.reshape(-1), getattr(expected, name), tol, name, atol=atol)
    assert torch.equal(stats.mixed.reshape(-1).cpu(), expected.mixed.cpu())
    for name, leaf in leaves.items():
        want = expected.grads.get(name)
        if want is None:
            assert leaf.grad is None, f"{name} got a gradient"
            continue
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        assert_close(leaf.grad, want, TOLERANCES[leaf.dtype], f"d loss / d {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_gradients_and_stats_match_float64(backend, options, dtype):
    options = dict(options)
    inputs, labels = make_inputs(dtype=dtype, bias=options.pop("bias", False))
    upstream = torch.rand(labels.shape, device=DEVICE)  # per-token upstream gradients
    check_against_truth(inputs, labels, backend, dtype, upstream=upstream, **options)


needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_the_cublas_logit_source_matches_float64(options, dtype, monkeypatch):
    from wmss_kernels import config

    monkeypatch.setattr(config, "LOGIT_SOURCE", "cublas")
    options = dict(options)
    inputs, labels = make_inputs(dtype=dtype, bias=options.pop("bias", False))
    check_against_truth(inputs, labels, "triton", dtype, **options)


@needs_triton
def test_the_backward_uses_the_logit_source_of_its_forward(monkeypatch):
    from wmss_kernels import config

    inputs, labels = make_inputs()
    monkeypatch.setattr(config, "LOGIT_SOURCE", "cublas")
    loss = wmss.fused_loss(**inputs, labels=labels, backend="triton")
    # An unpinned backward would read this and raise.
    monkeypatch.setattr(config, "LOGIT_SOURCE", "not-a-source")
    loss.backward()
    monkeypatch.setattr(config, "LOGIT_SOURCE", "triton")
    expected = truth(inputs, labels)
    for name, leaf in inputs.items():
        assert_close(leaf.grad.reshape(-1), expected.grads[name].reshape(-1) / (labels != -100).sum(),
                     1e-5, name)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_float16_matches_float64(backend):
    inputs, labels = make_inputs(dtype=torch.float16, bias=True)
    check_against_truth(inputs, labels, backend, torch.float16, softcap=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_sum_and_num_items_reductions(backend):
    inputs, labels = make_inputs()
    expected = truth(inputs, labels)
    count = int((labels != -100).sum())
    cases = {
        "mean": (dict(reduction="mean"), count),
        "sum": (dict(reduction="sum"), 1),
        "num_items int": (dict(num_items_in_batch=3 * count), 3 * count),
        "num_items tensor": (dict(num_items_in_batch=torch.tensor(2 * count, device=DEVICE)),
                             2 * count),
    }
    for what, (options, denominator) in cases.items():
        loss, _, grads = run(inputs, labels, backend, **options)
        assert loss.shape == () and loss.dtype == torch.float32, what
        assert math.isclose(loss.item(), expected.loss.sum().item() / denominator,
                            rel_tol=1e-5), what
        for name, grad in grads.items():
            assert_close(grad, expected.grads[name] / denominator, 1e-5, f"{what}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lam_one_and_zero_are_plain_cross_entropy(backend):
    inputs, labels = make_inputs()
    for lam, model, other in ((1.0, "strong", "weak"), (0.0, "weak", "strong")):
        h = inputs[f"{model}_hidden"].detach().double()
        w = inputs[f"{model}_weight"].detach().double()
        ce = F.cross_entropy((h @ w.T).reshape(-1, w.shape[0]), labels.reshape(-1))
        loss, stats, grads = run(inputs, labels, backend, lam=lam)
        assert math.isclose(loss.item(), ce.item(), rel_tol=1e-5)
        assert grads[f"{other}_hidden"].abs().max() == 0
        assert grads[f"{other}_weight"].abs().max() == 0
        supervised = labels != -100
        assert_close(stats.logprob_mix[supervised],
                     getattr(stats, f"logprob_{model}")[supervised], 1e-6, "logprob_mix")


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_models_are_plain_cross_entropy_for_any_lam(backend):
    inputs, labels = make_inputs(d_weak=48)
    inputs["weak_hidden"], inputs["weak_weight"] = inputs["strong_hidden"], inputs["strong_weight"]
    h = inputs["strong_hidden"].detach().double().reshape(-1, 48)
    ce = F.cross_entropy(h @ inputs["strong_weight"].detach().double().T, labels.reshape(-1))
    for lam in (0.1, 0.5, 0.9):
        loss, stats, _ = run(inputs, labels, backend, lam=lam)
        assert math.isclose(loss.item(), ce.item(), rel_tol=1e-5)
        assert_close(stats.entropy_weak, stats.entropy_strong, 1e-6, "entropies")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(backend, reduction):
    inputs, labels = make_inputs(ignored=1.0)
    loss, stats, grads = run(inputs, labels, backend, reduction=reduction, gap_threshold=0.1)
    assert torch.equal(loss, torch.zeros_like(loss))
    for name, grad in grads.items():
        assert grad is None or torch.equal(grad, torch.zeros_like(grad)), name
    for name in STAT_FIELDS:
        assert getattr(stats, name).abs().max() == 0
    assert not stats.mixed.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    """|z| ~ 1e4 with exactly representable inputs (integers, lam = 1/4), so float32 logits and
    their mixture are exact and the float32 tolerance applies to everything computed from them:
    peaked distributions, and a large common offset (+1e4 strong, -1e4 weak)."""
    shape, vocab, d = (2, 19), 300, 40
    for offset in (0.0, 1.0e4):
        inputs = {
            "strong_hidden": torch.randint(-1, 2, (*shape, d), device=DEVICE).float(),
            "strong_weight": torch.randint(-300, 301, (vocab, d), device=DEVICE).float(),
            "weak_hidden": torch.randint(-1, 2, (*shape, d), device=DEVICE).float(),
            "weak_weight": torch.randint(-3, 4, (vocab, d), device=DEVICE).float(),
            "strong_bias": torch.full((vocab,), offset, device=DEVICE),
            "weak_bias": torch.full((vocab,), -offset, device=DEVICE),
        }
        labels = torch.randint(0, vocab, shape, device=DEVICE)
        labels[0, :3] = -100
        check_against_truth(inputs, labels, backend, torch.float32, lam=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weak_model_gets_no_gradient_and_strong_is_unchanged(backend):
    inputs, labels = make_inputs(bias=True)
    _, _, trained = run(inputs, labels, backend)
    _, _, frozen = run(inputs, labels, backend, train_weak=False)
    for name in ("weak_hidden", "weak_weight", "weak_bias"):
        assert frozen[name] is None
    for name in ("strong_hidden", "strong_weight", "strong_bias"):
        assert_close(frozen[name], trained[name], 1e-6, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gap_threshold_extremes(backend):
    """+inf sends every token to plain strong CE (weak untouched); -inf mixes every token."""
    inputs, labels = make_inputs()
    paper, paper_stats, paper_grads = run(inputs, labels, backend)
    everything, _, everything_grads = run(inputs, labels, backend, gap_threshold=-math.inf)
    assert math.isclose(everything.item(), paper.item(), rel_tol=1e-6)
    for name in paper_grads:
        assert_close(everything_grads[name], paper_grads[name], 1e-6, name)

    nothing, stats, grads = run(inputs, labels, backend, gap_threshold=math.inf)
    supervised = labels != -100
    assert not stats.mixed.any()
    strong_ce = -paper_stats.logprob_strong[supervised].mean()
    assert math.isclose(nothing.item(), strong_ce.item(), rel_tol=1e-5)
    assert grads["weak_hidden"].abs().max() == 0 and grads["weak_weight"].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients_are_computed(backend):
    inputs, labels = make_inputs(bias=True)
    expected = truth(inputs, labels)
    count = (labels != -100).sum()
    for wanted in (["strong_hidden"], ["weak_weight", "strong_bias"], ["weak_bias"]):
        leaves = {k: v.detach().clone().requires_grad_(k in wanted) for k, v in inputs.items()}
        wmss.fused_loss(**leaves, labels=labels, backend=backend).backward()
        for name, leaf in leaves.items():
            if name in wanted:
                assert_close(leaf.grad, expected.grads[name] / count, 1e-5, name)
            else:
                assert leaf.grad is None


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_autocast_casts_like_linear_and_returns_float32_gradients(backend):
    """HF Trainer's bf16=True: float32 weights, hidden states and the head run in bf16."""
    inputs, labels = make_inputs(dtype=torch.float32)
    cast = {k: v.detach().to(torch.bfloat16) for k, v in inputs.items()}
    expected = truth(cast, labels)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = wmss.fused_loss(**leaves, labels=labels, backend=backend, reduction="sum")
    loss.backward()
    # The loss is float32, computed from the bf16-cast inputs: float32 precision against their
    # float64 truth. The gradients pass through bf16 (the cast's backward): bf16 precision.
    assert loss.dtype == torch.float32
    assert_close(loss, expected.loss.sum(), TOLERANCE[torch.float32], "loss")
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == torch.float32
        assert_close(leaf.grad, expected.grads[name], TOLERANCE[torch.bfloat16], name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_and_custom_ignore_index(backend):
    inputs, labels = make_inputs(ignored=0.0)
    labels[labels == 7] = 8
    labels[:, :2] = 7
    expected = truth(inputs, labels, ignore_index=7)
    loss, stats, _ = run(inputs, labels.int(), backend, ignore_index=7, reduction="sum")
    assert math.isclose(loss.item(), expected.loss.sum().item(), rel_tol=1e-5)
    assert not stats.mixed[:, :2].any() and stats.mixed[:, 2:].all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_results_are_deterministic(backend):
    inputs, labels = make_inputs(bias=True)
    first, _, first_grads = run(inputs, labels, backend, gap_threshold=0.0)
    second, _, second_grads = run(inputs, labels, backend, gap_threshold=0.0)
    assert torch.equal(first, second)
    for name in first_grads:
        assert torch.equal(first_grads[name], second_grads[name]), name


def test_module_face_equals_function():
    inputs, labels = make_inputs()
    criterion = wmss.FusedWMSSLoss(lam=0.3, softcap=5.0, reduction="sum")
    assert "lam=0.3" in repr(criterion)
    direct = wmss.fused_loss(**inputs, labels=labels, lam=0.3, softcap=5.0, reduction="sum")
    via_module = criterion(inputs["strong_hidden"], inputs["strong_weight"],
                           inputs["weak_hidden"], inputs["weak_weight"], labels)
    assert torch.equal(direct, via_module)


def test_no_grad_forward_and_empty_input():
    inputs, labels = make_inputs()
    with torch.no_grad():
        loss = wmss.fused_loss(**inputs, labels=labels)
    assert not loss.requires_grad
    empty, empty_labels = make_inputs(shape=(0,))
    assert wmss.fused_loss(**empty, labels=empty_labels).item() == 0.0
    assert wmss.fused_loss(**empty, labels=empty_labels, reduction="none").shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_gives_zero_and_zero_gradients(backend):
    inputs, labels = make_inputs(shape=(0,), bias=True)
    loss, stats, grads = run(inputs, labels, backend)
    assert loss.item() == 0.0 and stats.mixed.shape == (0,)
    for name, grad in grads.items():
        assert grad is not None and grad.shape == inputs[name].shape
        assert not grad.any(), name
    entropy = wmss.token_entropy(inputs["strong_hidden"], inputs["strong_weight"], labels,
                                 backend=backend)
    assert entropy.shape == (0,) and entropy.dtype == torch.float32


# Caps from binding (most logits saturate) to so large that the cap is the identity to float32
# precision: small arguments of tanh must keep their relative precision all the way. (Much
# smaller caps make the loss ill-conditioned: the slope sech^2(a / c) amplifies the float32
# rounding of the logits a by 2|a| / c, on every backend alike.)
SOFTCAPS = [0.5, 30.0, 1e5, 1e15, 1e30]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_soft_capping_keeps_float32_precision_for_every_cap(backend):
    inputs, labels = make_inputs(bias=True, logit_scale=6.0)
    for softcap in SOFTCAPS:
        check_against_truth(inputs, labels, backend, torch.float32, lam=0.3, softcap=softcap)


def test_a_cap_outside_float32s_range_is_refused():
    inputs, labels = make_inputs()
    for softcap in (1e39, 1e-50):
        with pytest.raises(ValueError, match="softcap must be between"):
            wmss.fused_loss(**inputs, labels=labels, softcap=softcap)


def rounding_error(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative error of the exact (float64) tensor rounded once to ``dtype``: the best any
    implementation returning ``dtype`` can do."""
    return float((exact.to(dtype).double() - exact).norm() / exact.norm())


# Each gradient's error against float64 may be at most this many times the error of rounding
# the exact gradient to the input dtype. The logit gradient itself is rounded once to the input
# dtype before its products, which costs a little on top of the final rounding.
HALF_PRECISION_ERROR_RATIO = {torch.float16: 1.5, torch.bfloat16: 2.5}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_half_precision_gradients_are_as_accurate_as_their_dtype_for_any_token_count(
        backend, dtype):
    # A mean over 2^16 tokens makes every coefficient 1.5e-5: folded into an fp16 logit gradient
    # (softmax entries ~1e-3) it would flush to fp16's subnormals.
    inputs, labels = make_inputs(shape=(4, 37), vocab=1000, d_strong=72, d_weak=40, dtype=dtype,
                                 bias=True, ignored=0.1)
    count = int((labels != -100).sum())
    for num_items in (None, 2**10, 2**16):
        denominator = count if num_items is None else num_items
        upstream = torch.full(labels.shape, 1.0 / denominator, dtype=torch.float64)
        expected = truth(inputs, labels, upstream=upstream)
        _, _, grads = run(inputs, labels, backend, num_items_in_batch=num_items)
        for name, grad in grads.items():
            want = expected.grads[name]
            ratio = relative_error(grad, want) / rounding_error(want, dtype)
            assert ratio <= HALF_PRECISION_ERROR_RATIO[dtype], (
                f"num_items_in_batch={num_items}: d loss / d {name} is {ratio:.2f}x the "
                f"rounding error of the exact gradient in {dtype}")


def with_small_blocks(monkeypatch):
    """The torch engine with blocks smaller than the test shapes: several vocabulary and token
    blocks, so the online statistics are merged across blocks."""
    from wmss.loss import engines as backends

    engine = backends.engine("torch")
    monkeypatch.setattr(engine, "token_block", 16)
    monkeypatch.setattr(engine, "vocab_block", 64)


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_float64_inputs_give_float64_accurate_loss_gradients_and_stats(backend, options,
                                                                      monkeypatch):
    with_small_blocks(monkeypatch)
    options = dict(options)
    inputs, labels = make_inputs(dtype=torch.float64, bias=options.pop("bias", False))
    upstream = torch.rand(labels.shape, device=DEVICE, dtype=torch.float64)
    check_against_truth(inputs, labels, backend, torch.float64, upstream=upstream, **options)


def check_mixed_pair(backend, strong_dtype, weak_dtype):
    """Each model keeps its own dtype; the pair is computed in float64 if either model is
    float64, and is as accurate as its less precise model."""
    inputs, labels = make_inputs(bias=True)
    inputs = {k: v.detach().to(strong_dtype if k.startswith("strong") else weak_dtype)
              for k, v in inputs.items()}
    lower = max((strong_dtype, weak_dtype), key=lambda dtype: TOLERANCES[dtype])
    check_against_truth(inputs, labels, backend, lower, lam=0.3, softcap=5.0, gap_threshold=0.0)


# (strong dtype, weak dtype); backend="triton" refuses float64 (see test_validation).
FLOAT64_PAIRS = {
    "float64-float32": (torch.float64, torch.float32),
    "float32-float64": (torch.float32, torch.float64),
    "float64-bfloat16": (torch.float64, torch.bfloat16),
}


@pytest.mark.parametrize("pair", list(FLOAT64_PAIRS.values()), ids=list(FLOAT64_PAIRS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_float64_model_mixes_with_a_less_precise_one_at_its_precision(backend, pair,
                                                                        monkeypatch):
    with_small_blocks(monkeypatch)
    check_mixed_pair(backend, *pair)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float32_model_mixes_with_a_bfloat16_one_at_bfloat16_precision(backend, monkeypatch):
    with_small_blocks(monkeypatch)
    check_mixed_pair(backend, torch.float32, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_inside_autocast_matches_float64_of_the_cast_inputs(backend):
    """Forward and backward both inside ``torch.autocast`` (a training step written that way)."""
    inputs, labels = make_inputs(dtype=torch.float32, bias=True)
    expected = truth({k: v.detach().to(torch.bfloat16) for k, v in inputs.items()}, labels,
                     softcap=5.0)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = wmss.fused_loss(**leaves, labels=labels, backend=backend, reduction="sum",
                               softcap=5.0)
        loss.backward()
    tol = TOLERANCE[torch.bfloat16]
    assert loss.dtype == torch.float32
    assert_close(loss, expected.loss.sum(), TOLERANCE[torch.float32], "loss")
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == torch.float32, name
        assert_close(leaf.grad, expected.grads[name], tol, name)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_autocast_leaves_a_float64_model_in_float64_as_linear_does(backend):
    inputs, labels = make_inputs(dtype=torch.float32)
    inputs.update({k: v.detach().double().requires_grad_() for k, v in inputs.items()
                   if k.startswith("strong")})
    expected = truth({k: v if k.startswith("strong") else v.detach().to(torch.bfloat16)
                      for k, v in inputs.items()}, labels)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = wmss.fused_loss(**inputs, labels=labels, backend=backend, reduction="sum")
    loss.backward()
    assert loss.dtype == torch.float64
    # Computed in float64 from the float64 strong inputs and the bf16-cast weak ones: float64
    # precision for the loss and the strong gradients; the weak ones come back through bf16.
    assert_close(loss, expected.loss.sum(), FLOAT64_TOLERANCE, "loss")
    for name, leaf in inputs.items():
        tol = FLOAT64_TOLERANCE if name.startswith("strong") else TOLERANCE[torch.bfloat16]
        assert_close(leaf.grad, expected.grads[name], tol, name)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_backward_inside_autocast_keeps_the_precision_of_its_forward(backend):
    """A float32 forward outside autocast, its backward inside: float32 gradients, not bf16.
    (Not "reference": plain autograd runs its backward matrix products under autocast on CPU.)"""
    inputs, labels = make_inputs(dtype=torch.float32)
    expected = truth(inputs, labels)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    loss = wmss.fused_loss(**leaves, labels=labels, backend=backend, reduction="sum")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss.backward()
    for name, leaf in leaves.items():
        assert_close(leaf.grad, expected.grads[name], TOLERANCE[torch.float32], name)


# backward(create_graph=True) warns of a reference cycle before it reaches the refusal.
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_double_backward_is_refused_by_the_fused_backends(backend):
    """A gradient penalty needs the derivative of the gradient, which the fused backward has
    not: asking for its graph raises at once, instead of a penalty whose gradient is 0."""
    inputs, labels = make_inputs()
    loss = wmss.fused_loss(**inputs, labels=labels, backend=backend)
    with pytest.raises(RuntimeError, match="double backward .* not supported .* "
                                           "backend='reference'"):
        torch.autograd.grad(loss, inputs["strong_weight"], create_graph=True)
    loss = wmss.fused_loss(**inputs, labels=labels, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        loss.backward(create_graph=True)


def mixed_mean_loss64(x: dict, labels: torch.Tensor, lam: float) -> torch.Tensor:
    """The paper's loss (mean over supervised tokens), differentiable to any order, in float64."""
    z_m = (lam * x["strong_hidden"] @ x["strong_weight"].T
           + (1 - lam) * x["weak_hidden"] @ x["weak_weight"].T)
    return F.cross_entropy(z_m.reshape(-1, z_m.shape[-1]), labels.reshape(-1))


def test_the_reference_backend_differentiates_a_gradient_penalty_exactly():
    """What the refusal above recommends: d/dtheta (loss + ||d loss / d W_strong||^2)."""
    inputs, labels = make_inputs(dtype=torch.float64)

    def penalised_grads(loss_fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        loss = loss_fn(leaves)
        (grad,) = torch.autograd.grad(loss, leaves["strong_weight"], create_graph=True)
        (loss + grad.square().sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    expected = penalised_grads(lambda x: mixed_mean_loss64(x, labels, 0.3))
    got = penalised_grads(lambda x: wmss.fused_loss(**x, labels=labels, lam=0.3,
                                                    backend="reference"))
    first_order = truth(inputs, labels, lam=0.3).grads["strong_hidden"] / (labels != -100).sum()
    # The penalty's term is not negligible: a first-order gradient alone would fail.
    assert relative_error(first_order, expected["strong_hidden"]) > 1e-3
    for name in inputs:
        assert_close(got[name], expected[name], FLOAT64_TOLERANCE, name)


# (strong dtype, weak dtype) pairs where the strong model is the less precise: the weak model's
# logit gradient must not be rounded to the strong model's dtype (the paper's loss shares one
# logit-gradient buffer between the models only when their dtypes agree).
LOW_PRECISION_STRONG_PAIRS = {
    "bfloat16-float32": (torch.bfloat16, torch.float32),
    "bfloat16-float16": (torch.bfloat16, torch.float16),
    "float16-float32": (torch.float16, torch.float32),
}
# The paper's loss (a shared buffer for one dtype), its frozen-weak-model variant (one gradient,
# a single accumulator for two half-precision models) and one buffer per model.
PAIR_OPTIONS = {
    "paper": dict(lam=0.3),
    "frozen-weak": dict(lam=0.3, train_weak=False),
    "softcap-gap": dict(lam=0.3, softcap=5.0, gap_threshold=0.0),
}


@pytest.mark.parametrize("options", list(PAIR_OPTIONS.values()), ids=list(PAIR_OPTIONS))
@pytest.mark.parametrize("pair", list(LOW_PRECISION_STRONG_PAIRS.values()),
                         ids=list(LOW_PRECISION_STRONG_PAIRS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_models_gradients_keep_their_own_precision_beside_a_less_precise_strong_model(
        backend, pair, options):
    """A bf16/fp16 strong model with a float32/fp16 weak one: the weak gradients at the weak
    dtype's tolerance, the strong ones at the strong dtype's, the loss at float32's."""
    strong_dtype, weak_dtype = pair
    inputs, labels = make_inputs(bias=True)
    inputs = {k: v.detach().to(strong_dtype if k.startswith("strong") else weak_dtype)
              for k, v in inputs.items()}
    check_against_truth(inputs, labels, backend, strong_dtype, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_models_at_gap_threshold_zero_mix_every_supervised_token(backend):
    """A token is mixed when H_weak - H_strong >= gap_threshold: identical models tie exactly
    (0 >= 0), so gap_threshold=0 mixes every supervised token and the result is the ungated
    mixed loss, gradients and all."""
    inputs, labels = make_inputs(d_weak=48, bias=True)
    for part in ("hidden", "weight", "bias"):
        inputs[f"weak_{part}"] = inputs[f"strong_{part}"].detach().clone().requires_grad_()
    ungated, _, ungated_grads = run(inputs, labels, backend, lam=0.3)
    gated, stats, gated_grads = run(inputs, labels, backend, lam=0.3, gap_threshold=0.0)
    supervised = labels != -100
    assert torch.equal(stats.entropy_weak, stats.entropy_strong)  # the tie is exact
    assert torch.equal(stats.mixed, supervised)
    assert stats.mixed[supervised].float().mean().item() == 1.0
    assert math.isclose(gated.item(), ungated.item(), rel_tol=1e-6)
    for name in ungated_grads:
        assert_close(gated_grads[name], ungated_grads[name], 1e-6, name)


TIES_TRIED = 3  # tokens whose exact gap becomes the threshold, one after another


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_token_exactly_at_the_gap_threshold_may_fall_either_side(backend):
    """With the threshold set to a token's float64 gap ``H_weak - H_strong``, float32 entropies
    decide that token by their rounding (about half each way): the check takes the
    computation's decision there, and only there (``oracle.GapDecisions``). Random inputs meet
    such a near tie rarely (once in ~10^3 calls), which made the check flaky before."""
    inputs, labels = make_inputs(bias=True)
    options = dict(lam=0.3, softcap=5.0)
    exact = truth(inputs, labels, **options)
    supervised = (labels.reshape(-1) != -100).nonzero().flatten()
    for token in supervised[:TIES_TRIED].tolist():
        tie = (exact.entropy_weak[token] - exact.entropy_strong[token]).item()
        check_against_truth(inputs, labels, backend, torch.float32, gap_threshold=tie, **options)


def test_the_truth_takes_a_computed_gap_decision_only_within_that_computations_error():
    """A decision away from the threshold must match float64's, whatever the computation says."""
    inputs, labels = make_inputs()
    exact = truth(inputs, labels, gap_threshold=0.0)
    gap = exact.entropy_weak - exact.entropy_strong
    supervised = labels.reshape(-1) != -100
    token = torch.where(supervised, gap.abs(), math.inf).argmin().item()  # the closest call
    far = torch.where(supervised, gap.abs(), -math.inf).argmax().item()
    flipped = exact.mixed.clone()
    flipped[[token, far]] = ~flipped[[token, far]]
    close = abs(gap[token].item())  # entropies off by this much explain the flip at ``token``
    entropy_strong = exact.entropy_strong.clone()
    entropy_strong[token] += close
    got = truth(inputs, labels, gap_threshold=0.0,
                decisions=GapDecisions(flipped, entropy_strong, exact.entropy_weak))
    assert got.mixed[token] == flipped[token]  # explained by the computation's own error
    assert got.mixed[far] == exact.mixed[far] != flipped[far]  # not explained: float64's stands
    assert torch.equal(got.mixed[:token], exact.mixed[:token])


# Non-contiguous inputs: each model's hidden states a column slice of wider rows (a row stride
# larger than d), its weight the transpose of a (d, V) tensor (unit stride along V, not d).
HIDDEN_PADDING = 8


@needs_triton
@pytest.mark.parametrize("options", [dict(lam=0.3), dict(lam=0.3, softcap=5.0, gap_threshold=0.0)],
                         ids=["paper", "softcap-gap"])
def test_sliced_and_transposed_inputs_give_the_results_of_contiguous_ones(options):
    inputs, labels = make_inputs(shape=(19,), vocab=70, d_strong=24, d_weak=16)
    contiguous, _, contiguous_grads = run(inputs, labels, "triton", **options)
    bases, views = {}, {}
    for model in ("strong", "weak"):
        hidden, weight = inputs[f"{model}_hidden"].detach(), inputs[f"{model}_weight"].detach()
        wide = torch.zeros(hidden.shape[0], hidden.shape[1] + HIDDEN_PADDING, device=DEVICE)
        wide[:, HIDDEN_PADDING // 2:][:, :hidden.shape[1]] = hidden
        bases[f"{model}_hidden"] = wide.requires_grad_()
        bases[f"{model}_weight"] = weight.t().contiguous().requires_grad_()  # (d, V)
        views[f"{model}_hidden"] = (
            bases[f"{model}_hidden"][:, HIDDEN_PADDING // 2:][:, :hidden.shape[1]])
        views[f"{model}_weight"] = bases[f"{model}_weight"].t()
    assert not any(v.is_contiguous() for v in views.values())
    loss, stats = wmss.fused_loss(**views, labels=labels, backend="triton", return_stats=True,
                                  **options)
    loss.backward()
    assert math.isclose(loss.item(), contiguous.item(), rel_tol=1e-6)
    for model in ("strong", "weak"):
        wide_grad = bases[f"{model}_hidden"].grad
        d = inputs[f"{model}_hidden"].shape[1]
        assert_close(wide_grad[:, HIDDEN_PADDING // 2:][:, :d],
                     contiguous_grads[f"{model}_hidden"], 1e-6, f"{model}_hidden")
        assert not wide_grad[:, :HIDDEN_PADDING // 2].any()
        assert not wide_grad[:, HIDDEN_PADDING // 2 + d:].any()
        assert_close(bases[f"{model}_weight"].grad.t(), contiguous_grads[f"{model}_weight"],
                     1e-6, f"{model}_weight")


# Launch settings small enough for the test shapes: 16-wide tiles, a vocabulary split across
# many programs, and backward pieces of 16 tokens x 32 vocabulary entries.
SMALL_TILES_FOR_TESTS = (16, 16, 16)
SMALL_GRAD_VOCAB_BLOCK = 32
SMALL_GRAD_BUFFER_BYTES = 16 * SMALL_GRAD_VOCAB_BLOCK * 8


def with_small_triton_launches(monkeypatch):
    """Every launch decision of the Triton backend, as ``wmss.fused_loss`` makes it, scaled down
    so tiny inputs take the multi-program and multi-piece paths: several token tiles and
    vocabulary tiles, vocabulary splits merged in the combine, and backward pieces of several
    token chunks and vocabulary blocks (dW accumulated across chunks)."""
    from wmss_kernels import config

    tiles = config.Tiles(*SMALL_TILES_FOR_TESTS, num_warps=4)
    monkeypatch.setattr(config, "stats_tiles", lambda dtype, arch: tiles)
    monkeypatch.setattr(config, "grad_tiles", lambda dtype, arch, single_accumulator: tiles)
    monkeypatch.setattr(config, "STATS_PROGRAMS_PER_SM", config.MAX_VOCAB_SPLITS)
    monkeypatch.setattr(config, "MIN_GRAD_VOCAB_BLOCK", SMALL_GRAD_VOCAB_BLOCK)
    monkeypatch.setattr(config, "GRAD_BUFFER_MIN_BYTES", SMALL_GRAD_BUFFER_BYTES)
    monkeypatch.setattr(config, "GRAD_BUFFER_MAX_BYTES", SMALL_GRAD_BUFFER_BYTES)


def spy(monkeypatch, module, name) -> list:
    """Record every result of ``module.name`` (the launch plans actually made)."""
    original, results = getattr(module, name), []

    def recorded(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, recorded)
    return results


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_the_public_triton_path_in_many_tiles_splits_and_pieces_matches_float64(
        options, dtype, monkeypatch):
    with_small_triton_launches(monkeypatch)
    options = dict(options)
    inputs, labels = make_inputs(shape=(3, 13), vocab=150, dtype=dtype,
                                 bias=options.pop("bias", False))
    from wmss_kernels import fused_stats, logit_grad

    splits = spy(monkeypatch, fused_stats, "_choose_splits")
    pieces = spy(monkeypatch, logit_grad, "plan_grad_blocks")
    upstream = torch.rand(labels.shape, device=DEVICE)
    check_against_truth(inputs, labels, "triton", dtype, upstream=upstream, **options)
    assert splits and all(num_splits > 1 for num_splits, _ in splits), splits
    assert pieces and all(blocks.vocab_block < 150 for blocks in pieces), pieces
    if dtype == torch.float32:  # two float32 buffers: the tokens are cut into chunks too
        assert all(blocks.token_chunk < labels.numel() for blocks in pieces), pieces
