"""Bad input fails early with an error that names the argument, never as a NaN or a kernel crash."""

import math

import pytest
import torch
from conftest import DEVICE, make_inputs

import wmss


def call(**overrides):
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    kwargs = dict(inputs, labels=labels)
    kwargs.update(overrides)
    return wmss.fused_loss(**kwargs)


@pytest.mark.parametrize("overrides, error, names", [
    (dict(lam=1.5), ValueError, "lam"),
    (dict(lam=-0.1), ValueError, "lam"),
    (dict(lam=math.nan), ValueError, "lam"),
    (dict(lam="0.5"), TypeError, "lam"),
    (dict(lam=True), TypeError, "lam"),
    (dict(softcap=math.inf), ValueError, "softcap"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=math.nan), ValueError, "softcap"),
    (dict(gap_threshold=math.nan), ValueError, "gap_threshold"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(train_weak="yes"), TypeError, "train_weak"),
    (dict(return_stats=1), TypeError, "return_stats"),
    (dict(ignore_index=2**63), ValueError, "ignore_index"),
    (dict(num_items_in_batch=-3), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch="8"), TypeError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=8, reduction="sum"), ValueError, "num_items_in_batch"),
])
def test_bad_options(overrides, error, names):
    with pytest.raises(error, match=names):
        call(**overrides)


# Counts that used to be clamped to 1 without a word (the loss silently became the sum).
@pytest.mark.parametrize("count, error, message", [
    (-5, ValueError, "must be a whole number >= 0, got -5"),
    (0.5, ValueError, "must be a whole number >= 0, got 0.5"),
    (12.5, ValueError, "must be a whole number >= 0, got 12.5"),
    (math.nan, ValueError, "must be a whole number >= 0, got nan"),
    (math.inf, ValueError, "must be a whole number >= 0, got inf"),
    (2**64, ValueError, "must be a whole number >= 0"),
    # 0 counts the supervised tokens of a batch that has none: not these labels.
    (0, ValueError, "is 0 but labels holds .* supervised tokens"),
    (torch.tensor(0), ValueError, "is 0 but labels holds"),
    (torch.tensor(0.0), ValueError, "is 0 but labels holds"),
    (True, TypeError, "must be an int, a one-element tensor or None, got bool"),
    (torch.tensor(-5), ValueError, "must be >= 0, got a torch.int64 tensor holding -5"),
    (torch.tensor([-1], dtype=torch.int32), ValueError, "must be >= 0, got a torch.int32"),
    (torch.tensor(-2.0), ValueError, "must be finite and >= 0"),
    (torch.tensor(math.nan), ValueError, "must be finite and >= 0, got a torch.float32 tensor "
                                         "holding nan"),
    (torch.tensor(math.inf, dtype=torch.float64), ValueError, "must be finite and >= 0"),
    (torch.tensor(True), TypeError, "must be an integer or floating tensor, got torch.bool"),
    (torch.tensor(3 + 0j), TypeError, "must be an integer or floating tensor"),
    (torch.tensor([[3, 4]]), ValueError, "one-element tensor, got a tensor of shape \\(1, 2\\)"),
    (torch.tensor(8).to("meta"), ValueError, "is on meta"),
], ids=repr)
def test_a_bad_num_items_in_batch_is_refused(count, error, message):
    with pytest.raises(error, match=f"num_items_in_batch.*{message}"):
        call(num_items_in_batch=count)


def test_the_module_checks_num_items_in_batch_too():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    with pytest.raises(ValueError, match="num_items_in_batch .*must be a whole number >= 0"):
        wmss.FusedWMSSLoss()(*inputs.values(), labels, num_items_in_batch=-1)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
@pytest.mark.parametrize("count", [0, torch.tensor(0), torch.tensor(0.0)], ids=repr)
def test_a_count_of_zero_for_a_batch_with_nothing_supervised_gives_zero(backend, count):
    """Training on masked data can accumulate a batch without a supervised token: loss 0 and zero
    gradients, never NaN, as without num_items_in_batch."""
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    loss = wmss.fused_loss(**inputs, labels=torch.full_like(labels, -100),
                           num_items_in_batch=count, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    for name, tensor in inputs.items():
        assert torch.equal(tensor.grad, torch.zeros_like(tensor)), name


@pytest.mark.parametrize("count", [
    7, 7.0, torch.tensor(7), torch.tensor([7], dtype=torch.int32),
    # Hugging Face Trainer divides the count by the ranks sharing a batch: a float tensor.
    torch.tensor(7.0), torch.tensor(3.5, dtype=torch.float64),
], ids=repr)
def test_good_num_items_in_batch_divide_the_sum(count):
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    total = wmss.fused_loss(**inputs, labels=labels, reduction="sum")
    mean = wmss.fused_loss(**inputs, labels=labels, num_items_in_batch=count)
    assert mean.dtype == torch.float32
    assert math.isclose(mean.item(), total.item() / float(count), rel_tol=1e-6)


def test_a_count_on_the_device_is_checked_in_the_label_checks_sync(monkeypatch):
    """On a GPU the count's value is read in the one host sync of the label check; here a CPU
    count stands in for it (the same code path)."""
    from wmss.loss import inputs as validation

    monkeypatch.setattr(validation, "readable_without_sync", lambda t: False)
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    for bad in (torch.tensor(-1), torch.tensor(-2.0), torch.tensor(math.nan)):
        with pytest.raises(ValueError, match="num_items_in_batch .*tensor holding"):
            wmss.fused_loss(**inputs, labels=labels, num_items_in_batch=bad)
    with pytest.raises(ValueError, match="num_items_in_batch is 0 but labels holds"):
        wmss.fused_loss(**inputs, labels=labels, num_items_in_batch=torch.tensor(0))
    wrong = labels.clone()
    wrong[0, 0] = 40
    with pytest.raises(ValueError, match="labels must lie in"):  # both wrong: labels first
        wmss.fused_loss(**inputs, labels=wrong, num_items_in_batch=torch.tensor(0))
    total = wmss.fused_loss(**inputs, labels=labels, reduction="sum")
    mean = wmss.fused_loss(**inputs, labels=labels, num_items_in_batch=torch.tensor(6))
    assert math.isclose(mean.item(), total.item() / 6, rel_tol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")
def test_a_bad_count_on_the_gpu_is_refused():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    for bad in (torch.tensor(-1), torch.tensor(-5.0), torch.tensor(math.inf)):
        with pytest.raises(ValueError, match="num_items_in_batch .*tensor holding"):
            wmss.fused_loss(**inputs, labels=labels, num_items_in_batch=bad.to(DEVICE))


def test_shape_mismatches_name_the_argument():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    cases = {
        "strong_weight": dict(strong_weight=torch.randn(40, 17)),
        "weak_weight has vocabulary size": dict(weak_weight=torch.randn(41, 12)),
        "weak_hidden has leading shape": dict(weak_hidden=torch.randn(2, 6, 12)),
        "labels has shape": dict(labels=labels[:, :4]),
        "strong_bias": dict(strong_bias=torch.randn(39)),
        "weak_weight must be 2-D": dict(weak_weight=torch.randn(40, 12, 1)),
    }
    for message, overrides in cases.items():
        kwargs = dict(inputs, labels=labels)
        kwargs.update({k: v.to(DEVICE) for k, v in overrides.items()})
        with pytest.raises(ValueError, match=message):
            wmss.fused_loss(**kwargs)


def test_labels_out_of_range_are_rejected():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    for bad in (40, -1, -101):
        wrong = labels.clone()
        wrong[1, 3] = bad
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 40\).*{bad}"):
            wmss.fused_loss(**inputs, labels=wrong)


def test_wrong_types_are_type_errors():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        wmss.fused_loss(**inputs, labels=labels.float())
    with pytest.raises(TypeError, match="strong_hidden must be a torch.Tensor"):
        wmss.fused_loss(**dict(inputs, strong_hidden=[1.0]), labels=labels)
    with pytest.raises(TypeError, match="weak_weight must be a floating tensor"):
        wmss.fused_loss(**dict(inputs, weak_weight=torch.ones(40, 12, dtype=torch.long)),
                        labels=labels)


def test_mixed_dtypes_outside_autocast_are_rejected():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    with pytest.raises(ValueError, match="strong_hidden is torch.bfloat16 but strong_weight is"):
        wmss.fused_loss(**dict(inputs, strong_hidden=inputs["strong_hidden"].bfloat16()),
                        labels=labels)
    with pytest.raises(ValueError, match="weak_bias is torch.float64"):
        wmss.fused_loss(**inputs, weak_bias=torch.zeros(40, dtype=torch.float64, device=DEVICE),
                        labels=labels)


def test_mixed_devices_are_rejected():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    with pytest.raises(ValueError, match="labels is on meta"):
        wmss.fused_loss(**inputs, labels=labels.to("meta"))


def test_inputs_that_used_to_crash_deep_inside_name_the_argument():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        wmss.fused_loss(**inputs, labels=labels.tolist())
    zero_d = dict(inputs, weak_hidden=torch.randn(2, 5, 0, device=DEVICE),
                  weak_weight=torch.randn(40, 0, device=DEVICE))
    with pytest.raises(ValueError, match="weak_hidden and weak_weight have hidden size 0"):
        wmss.fused_loss(**zero_d, labels=labels)
    meta = {k: v.detach().to("meta") for k, v in inputs.items()}
    with pytest.raises(ValueError, match="strong_hidden is on meta"):
        wmss.fused_loss(**meta, labels=labels.to("meta"))
    with pytest.raises(TypeError, match="strong_weight must be a dense"):
        wmss.fused_loss(**dict(inputs, strong_weight=inputs["strong_weight"].detach().to_sparse()),
                        labels=labels)


def test_token_entropy_names_the_argument_too():
    hidden, weight = torch.randn(2, 5, 8, device=DEVICE), torch.randn(30, 8, device=DEVICE)
    labels = torch.randint(0, 30, (2, 5), device=DEVICE)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        wmss.token_entropy(hidden, weight, labels.tolist())
    with pytest.raises(ValueError, match="hidden and weight have hidden size 0"):
        wmss.token_entropy(hidden[..., :0], weight[:, :0])
    with pytest.raises(ValueError, match="hidden is on meta"):
        wmss.token_entropy(hidden.to("meta"), weight.to("meta"))
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        wmss.token_entropy(hidden, weight, labels, ignore_index=-2**63 - 1)


def test_float64_tensors_stay_float64_under_autocast_as_for_linear():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="strong_hidden is torch.float64 but strong_weight "
                                             "is torch.bfloat16; torch.autocast does not cast "
                                             "float64"):
            wmss.fused_loss(**dict(inputs, strong_hidden=inputs["strong_hidden"].double()),
                            labels=labels)


def test_triton_backend_refuses_what_it_cannot_run():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12,
                                 dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton'"):
        wmss.fused_loss(**inputs, labels=labels, backend="triton")
    # Only one model in float64 is refused as clearly, naming it.
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    with pytest.raises(ValueError,
                       match="backend='triton' supports .*weak_hidden is torch.float64"):
        wmss.fused_loss(**dict(inputs, weak_hidden=inputs["weak_hidden"].double(),
                               weak_weight=inputs["weak_weight"].double()),
                        labels=labels, backend="triton")


def test_auto_picks_torch_on_cuda_for_what_triton_cannot_run(monkeypatch):
    from wmss.loss import engines as backends

    monkeypatch.setattr(backends, "is_interpreting", lambda: False)
    cuda = torch.device("cuda")
    assert backends.resolve("auto", cuda, [("h", torch.bfloat16), ("w", torch.float32)]) == "triton"
    assert backends.resolve("auto", cuda, [("h", torch.float32), ("w", torch.float64)]) == "torch"


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="lam"):
        wmss.FusedWMSSLoss(lam=2.0)
    with pytest.raises(ValueError, match="backend"):
        wmss.FusedWMSSLoss(backend="fast")
