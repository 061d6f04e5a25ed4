"""wmss: fast, memory-lean Weak-Driven Learning (WMSS) post-training for causal LMs.

* ``wmss.fused_loss``: the mixed-logit cross-entropy from hidden states and lm-head weights,
  without materialising ``[tokens, vocab]`` logits, with per-token statistics in the same pass.
* ``wmss.token_entropy``: per-token entropies of one model, likewise fused.
* ``wmss.selection``: WD-DS, the entropy-discrepancy selection of the active training set.
* ``wmss.apply_wmss``: the fused loss for any Hugging Face causal LM pair.

See ``SPEC.md`` (shared with the project) for the method and the contract of these names.
"""

from .entropy import token_entropy
from .loss import FusedWMSSLoss, fused_loss
from .stats import TokenStats

__version__ = "0.1.0"

__all__ = ["FusedWMSSLoss", "TokenStats", "__version__", "fused_loss", "token_entropy"]
