"""wmss: fast, memory-lean Weak-Driven Learning (WMSS) post-training for causal LMs.

* ``wmss.fused_loss``: the mixed-logit cross-entropy from hidden states and lm-head weights,
  without materialising ``[tokens, vocab]`` logits, with per-token statistics in the same pass.
* ``wmss.token_entropy``: per-token entropies of one model, likewise fused.
* ``wmss.selection``: WD-DS, the entropy-discrepancy selection of the active training set.
* ``wmss.apply_wmss``: the fused loss for any Hugging Face causal LM pair; ``wmss.WMSSTrainer``
  trains the pair with ``transformers.Trainer``; ``wmss.pipeline`` runs the whole recipe.

See ``docs/design.md`` for the method (section 1), the fused computation (section 2), the
engine contract (section 3) and the memory bounds and precision rules (section 4).
Names that need transformers are imported on first use, so ``import wmss`` stays light.
"""

import importlib

from .entropy import token_entropy
from .loss import FusedWMSSLoss, fused_loss
from .stats import TokenStats

__version__ = "0.1.0"

_LAZY = {
    "apply_wmss": ("wmss.pair", "apply_wmss"),
    "WMSSPair": ("wmss.pair", "WMSSPair"),
    "WMSSTrainer": ("wmss.trainer", "WMSSTrainer"),
    "selection": ("wmss.selection", None),
    "pipeline": ("wmss.pipeline", None),
}

__all__ = ["FusedWMSSLoss", "TokenStats", "__version__", "fused_loss", "token_entropy", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module 'wmss' has no attribute {name!r}")
