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
    (dict(num_items_in_batch=-3), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch="8"), TypeError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=8, reduction="sum"), ValueError, "num_items_in_batch"),
])
def test_bad_options(overrides, error, names):
    with pytest.raises(error, match=names):
        call(**overrides)


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


def test_triton_backend_refuses_what_it_cannot_run():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12,
                                 dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton'"):
        wmss.fused_loss(**inputs, labels=labels, backend="triton")


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="lam"):
        wmss.FusedWMSSLoss(lam=2.0)
    with pytest.raises(ValueError, match="backend"):
        wmss.FusedWMSSLoss(backend="fast")
