"""Memory bounds: the fused paths never hold anything the size of the [tokens, vocab] logits.

CPU: the peak resident set size of a fresh process, measured around one forward + backward.
CUDA (when present): ``torch.cuda.max_memory_allocated`` around the same step.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

N, V, D = 8192, 16384, 16
LOGITS_BYTES = N * V * 4  # one [N, V] float32 tensor: 512 MiB

_PROBE = textwrap.dedent("""
    import json, resource, sys, torch, wmss
    torch.manual_seed(0)
    N, V, D, backend = {N}, {V}, {D}, sys.argv[1]
    leaf = lambda *s: (torch.randn(*s) * 0.5).requires_grad_()
    inputs = dict(strong_hidden=leaf(N, D), strong_weight=leaf(V, D),
                  weak_hidden=leaf(N, D), weak_weight=leaf(V, D))
    labels = torch.randint(0, V, (N,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = wmss.fused_loss(**inputs, labels=labels, backend=backend, gap_threshold=0.0)
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(growth=after - before, loss=loss.item())))
""").format(N=N, V=V, D=D)


def peak_rss_growth(backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, backend], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_torch_backend_rss_growth_is_a_small_fraction_of_the_logits():
    """Bound (see wmss/loss/engines/torch_engine.py): about ten [256, 2048] float32 blocks plus the gradients
    (2 * V * D + 2 * N * D floats) and O(N) statistics: ~25 MiB here, under 10% of one [N, V]."""
    fused = peak_rss_growth("torch")
    assert fused["growth"] < 0.10 * LOGITS_BYTES, fused
    # The same measurement sees the materialising formula: the bound is not vacuous.
    naive = peak_rss_growth("reference")
    assert naive["growth"] > LOGITS_BYTES, naive
    assert abs(fused["loss"] - naive["loss"]) < 1e-4 * abs(naive["loss"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_backend_cuda_peak_is_the_gradients_plus_ten_percent():
    """Issue 6's bound: peak memory above the inputs at most the gradients themselves (dW in
    bf16, written once per vocabulary block; dh in bf16 plus its float32 accumulator) plus 10%."""
    import wmss

    n, v, d = 4096, 151936, 1024
    leaf = lambda *s: (torch.randn(*s, device="cuda") * 0.05).bfloat16().requires_grad_()  # noqa: E731
    inputs = dict(strong_hidden=leaf(n, d), strong_weight=leaf(v, d),
                  weak_hidden=leaf(n, d), weak_weight=leaf(v, d))
    labels = torch.randint(0, v, (n,), device="cuda")
    wmss.fused_loss(**inputs, labels=labels).backward()  # warm-up: kernels, cuBLAS workspace
    for t in inputs.values():
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    wmss.fused_loss(**inputs, labels=labels).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    gradients = 2 * (v * d * 2 + n * d * (2 + 4))
    assert peak <= 1.10 * gradients, (peak / 2**20, gradients / 2**20)
    assert peak < n * v * 2, "as large as one bf16 [N, V] logits tensor"
