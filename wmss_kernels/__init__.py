"""Triton kernels of wmss and their launchers (no autograd, no Hugging Face).

* ``fused_stats``: forward statistics of one model or of the mixed pair, logits never materialised.
* ``logit_grad``: backward, recomputing logit tiles and handing chunked logit gradients to cuBLAS.
* ``logit_stats``: one model's logit statistics (``wmss.logit_stats``).
* ``logit_tiles``: the ``@triton.jit`` building blocks they share.
* ``products``: the cuBLAS products, with float32 accumulation whatever the operands.
* ``config``: every tile shape, launch setting and memory budget.
* ``compile_check``: ahead-of-time compilation of every production configuration.

The launchers take and return the types of the engine contract,
``wmss.loss.engines.contract`` (``ModelInputs``, ``MixedLossSpec``, ``MixedTokenStats``...).
Submodules that need Triton are imported on first use, so ``wmss_kernels.config`` works on
machines without Triton.
"""

import importlib

_LAZY = {
    "mixed_token_stats": "fused_stats",
    "single_token_stats": "fused_stats",
    "mixed_ce_backward": "logit_grad",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
