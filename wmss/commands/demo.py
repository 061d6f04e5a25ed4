"""``wmss demo``: the fused mixed-logit loss on a synthetic problem, checked against the formula."""

from __future__ import annotations

import time

import torch

import wmss


def add_arguments(parser) -> None:
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the batch")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of both models")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    torch.manual_seed(args.seed)
    n, v, d = args.tokens, args.vocab, args.hidden
    inputs = {
        "strong_hidden": torch.randn(n, d), "strong_weight": torch.randn(v, d) / d ** 0.5,
        "weak_hidden": torch.randn(n, d), "weak_weight": torch.randn(v, d) / d ** 0.5,
    }
    labels = torch.randint(0, v, (n,))
    results = {}
    for backend in ("torch", "reference"):
        leaves = {k: t.clone().requires_grad_() for k, t in inputs.items()}
        start = time.perf_counter()
        loss = wmss.fused_loss(**leaves, labels=labels, backend=backend)
        loss.backward()
        results[backend] = (loss.item(), time.perf_counter() - start,
                            leaves["strong_weight"].grad)
        print(f"{backend:>9}: loss {results[backend][0]:.6f}  forward+backward "
              f"{results[backend][1]:.2f} s")
    diff = (results["torch"][2] - results["reference"][2]).norm() / results["reference"][2].norm()
    print(f"fused vs materialised: |loss diff| {abs(results['torch'][0] - results['reference'][0]):.2e}, "
          f"relative strong_weight gradient diff {diff:.2e}")
    return 0
