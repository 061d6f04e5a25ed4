"""Shared fixtures. Without a GPU, the Triton kernels run under Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before Triton is first imported, which is why it is set here,
before anything imports ``wmss`` or ``triton``.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from wmss_kernels.config import is_interpreting  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_AVAILABLE = DEVICE.type == "cuda" or is_interpreting()

# Relative tolerance on ||actual - expected|| / ||expected|| against the float64 truth.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}

BACKENDS = [
    "reference",
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")),
]
FAST_BACKENDS = BACKENDS[1:]  # the ones that never materialise logits


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: larger shapes (deselect with -m 'not slow')")


@pytest.fixture
def device():
    return DEVICE


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (``||actual||`` when expected is 0)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = expected.norm()
    diff = (actual - expected).norm()
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(actual, expected, tol: float, what: str = "", atol: float = 0.0) -> None:
    """``||actual - expected|| <= tol * ||expected|| + atol * sqrt(numel)``.

    ``atol`` (per element, RMS) is for quantities that can be ~0 everywhere, such as the entropy
    of a near one-hot distribution, where float32 resolves only about 1e-7 nats.
    """
    err = relative_error(actual, expected)
    scale = float(expected.detach().double().norm())
    slack = atol * expected.numel() ** 0.5 / scale if scale > 0 else atol * expected.numel() ** 0.5
    assert err <= tol + slack, f"{what}: relative error {err:.3e} > {tol:.1e} (+{slack:.1e})"


# Fresh random inputs every run; WMSS_TEST_SEED=<n> replays a run (the seed is in the header).
SEED = int(os.environ.get("WMSS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"wmss: device={DEVICE}, triton interpreter={is_interpreting()}, WMSS_TEST_SEED={SEED}"


@pytest.fixture(autouse=True)
def _seed(request):
    # One stream per test, derived from the run's seed and the test's name: reproducible alone.
    torch.manual_seed((SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63)


def make_inputs(shape=(3, 13), vocab=300, d_strong=48, d_weak=40, dtype=torch.float32,
                bias=False, logit_scale=3.0, ignored=0.25, device=DEVICE):
    """Leaf tensors of one mixed-loss call (requires_grad) and its labels.

    Sizes default to non-multiples of every tile; ``ignored`` of the labels are -100.
    """
    def leaf(*size, scale=1.0):
        return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_()

    inputs = {
        "strong_hidden": leaf(*shape, d_strong),
        "strong_weight": leaf(vocab, d_strong, scale=logit_scale / d_strong ** 0.5),
        "weak_hidden": leaf(*shape, d_weak),
        "weak_weight": leaf(vocab, d_weak, scale=logit_scale / d_weak ** 0.5),
    }
    if bias:
        inputs["strong_bias"] = leaf(vocab)
        inputs["weak_bias"] = leaf(vocab)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < ignored] = -100
    return inputs, labels
