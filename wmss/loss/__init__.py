"""The fused loss and its engines (no Hugging Face here).

Read top-down:

* ``fused.py``: ``fused_loss`` and ``FusedWMSSLoss``, the public entry points;
  ``entropy.py``: ``token_entropy``; ``logit_statistics.py``: ``logit_stats`` and
  ``LogitStats``, per-token logit statistics; ``stats.py``: ``TokenStats``, what
  ``return_stats`` gives.
* ``options.py``: ``LossOptions``, the options the three entry points (with ``apply_wmss``) share,
  checked once; ``inputs.py``: the checks and preparation of the tensors.
* ``engines/``: the engine contract (``contract.py``) and its implementations: ``torch_engine``,
  ``triton_engine`` (over ``wmss_kernels``) and ``reference``; ``autograd.py`` turns a fused
  engine's forward and backward into a differentiable loss (two custom ops).
"""

from .entropy import token_entropy
from .fused import FusedWMSSLoss, fused_loss, fused_loss_with
from .logit_statistics import LogitStats, logit_stats
from .options import LossOptions
from .stats import TokenStats

__all__ = ["FusedWMSSLoss", "LogitStats", "LossOptions", "TokenStats", "fused_loss",
           "fused_loss_with", "logit_stats", "token_entropy"]
