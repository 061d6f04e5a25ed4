"""wmss.token_entropy: one model's per-token entropies against float64, for every backend."""

import pytest
import torch
from conftest import BACKENDS, DEVICE, TOLERANCE, assert_close

import wmss

# float64 inputs are computed in float64 throughout (backends "torch" and "reference").
FLOAT64_TOLERANCE = 1e-12


def entropy64(hidden, weight, bias=None, softcap=None):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = z.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_matches_float64(backend, dtype):
    hidden = torch.randn(4, 9, 56, device=DEVICE).to(dtype)
    weight = (torch.randn(517, 56, device=DEVICE) * 0.4).to(dtype)
    bias = torch.randn(517, device=DEVICE).to(dtype)
    for options in (dict(), dict(bias=bias, softcap=3.0)):
        got = wmss.token_entropy(hidden, weight, backend=backend, **options)
        assert got.shape == (4, 9) and got.dtype == torch.float32 and not got.requires_grad
        assert_close(got, entropy64(hidden, weight, **options), TOLERANCE[dtype], str(options))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_float64_inputs_give_float64_accurate_entropies(backend):
    hidden = torch.randn(4, 9, 56, device=DEVICE, dtype=torch.float64)
    weight = torch.randn(517, 56, device=DEVICE, dtype=torch.float64) * 0.4
    bias = torch.randn(517, device=DEVICE, dtype=torch.float64)
    for options in (dict(), dict(bias=bias, softcap=3.0)):
        got = wmss.token_entropy(hidden, weight, backend=backend, **options)
        assert got.dtype == torch.float64
        assert_close(got, entropy64(hidden, weight, **options), FLOAT64_TOLERANCE, str(options))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_the_inputs_but_the_logits_still_accumulate_in_float32(backend):
    hidden = torch.randn(4, 9, 56, device=DEVICE)
    weight = torch.randn(517, 56, device=DEVICE) * 0.4
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = wmss.token_entropy(hidden, weight, backend=backend)
    assert got.dtype == torch.float32
    expected = entropy64(hidden.bfloat16(), weight.bfloat16())
    assert_close(got, expected, TOLERANCE[torch.float32], "entropy under autocast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_positions_are_zero_and_the_rest_unchanged(backend):
    hidden = torch.randn(3, 11, 24, device=DEVICE)
    weight = torch.randn(130, 24, device=DEVICE)
    labels = torch.randint(0, 130, (3, 11), device=DEVICE)
    labels[:, :4] = -100
    everywhere = wmss.token_entropy(hidden, weight, backend=backend)
    masked = wmss.token_entropy(hidden, weight, labels, backend=backend)
    assert masked[:, :4].abs().max() == 0
    assert_close(masked[:, 4:], everywhere[:, 4:], 1e-6)


def test_entropy_of_uniform_and_one_hot_distributions():
    """log V for identical logits, ~0 for a dominant logit."""
    hidden = torch.ones(2, 8, device=DEVICE)
    uniform = wmss.token_entropy(hidden, torch.ones(1000, 8, device=DEVICE))
    assert torch.allclose(uniform, torch.full_like(uniform, torch.log(torch.tensor(1000.0))))
    peaked_weight = torch.zeros(1000, 8, device=DEVICE)
    peaked_weight[3] = 1e3
    assert wmss.token_entropy(hidden, peaked_weight).abs().max() < 1e-6


def test_entropy_needs_no_gradient_and_validates():
    hidden = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(20, 8, device=DEVICE, requires_grad=True)
    assert not wmss.token_entropy(hidden, weight).requires_grad
    with pytest.raises(ValueError, match="weight has hidden size"):
        wmss.token_entropy(hidden, torch.randn(20, 9, device=DEVICE))
    with pytest.raises(ValueError, match="labels must lie in"):
        wmss.token_entropy(hidden, weight, torch.full((5,), 20, device=DEVICE))
