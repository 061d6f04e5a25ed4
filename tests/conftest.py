"""Shared fixtures. Without a GPU, the Triton kernels run under Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before Triton is first imported, which is why it is set here,
before anything imports ``wmss`` or ``triton``.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread by default. The tests' tensors are tiny: splitting a [39, 48] @ [48, 300]
# matmul over two threads costs a wake-up and a barrier per op, and on a busy 2-core machine (CI,
# or several people sharing one) the second thread is often descheduled, so every op waits for
# it (measured 17 us on one thread, 29 us on two, with the other core busy; the issue saw far
# worse). The suite on 2 cores: 5 min 13 s with torch's default of 2 threads, 3 min 45 s on
# one (README, "Development"). WMSS_TEST_THREADS=<n> chooses another count (e.g. to exercise
# torch's parallel paths). OMP_NUM_THREADS is set too (unless the user set it) so that the
# subprocesses the tests start (torchrun workers, probes) inherit the same count; tests that
# pass their own OMP_NUM_THREADS keep theirs.
TEST_THREADS_VARIABLE = "WMSS_TEST_THREADS"
_threads = os.environ.get(TEST_THREADS_VARIABLE, "1")
if not (_threads.isascii() and _threads.isdigit()) or int(_threads) < 1:
    raise ValueError(f"{TEST_THREADS_VARIABLE} must be a positive integer, got {_threads!r}")
TEST_THREADS = int(_threads)
torch.set_num_threads(TEST_THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))

import pytest  # noqa: E402

from wmss_kernels.config import is_interpreting  # noqa: E402
from wmss.loss.engines.native_engine import available as native_available  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_AVAILABLE = DEVICE.type == "cuda" or is_interpreting()

# Relative tolerance on ||actual - expected|| / ||expected|| against the float64 truth.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}

BACKENDS = [
    "reference",
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")),
    pytest.param("native", marks=pytest.mark.skipif(
        DEVICE.type != "cpu" or not native_available(), reason="the native CPU engine did not "
        "build here (see wmss.loss.engines.native_engine.unavailable_reason)")),
]
FAST_BACKENDS = BACKENDS[1:]  # the ones that never materialise logits


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: over ~3 s on 2 CPU cores (deselect with -m 'not slow')")


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
    return (f"wmss: device={DEVICE}, triton interpreter={is_interpreting()}, "
            f"WMSS_TEST_SEED={SEED}, "
            f"torch threads={torch.get_num_threads()} ({TEST_THREADS_VARIABLE})")


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
