"""wmss: fast, memory-lean Weak-Driven Learning (WMSS) post-training for causal LMs.

* ``wmss.fused_loss``: the mixed-logit cross-entropy from hidden states and lm-head weights,
  without materialising ``[tokens, vocab]`` logits, with per-token statistics in the same pass.
* ``wmss.token_entropy``: per-token entropies of one model, likewise fused;
  ``wmss.logit_stats``: per-token logit statistics (target, non-target mean and max, margin,
  rank, entropy, log-prob), likewise fused.
* ``wmss.selection``: WD-DS, the entropy-discrepancy selection of the active training set.
* ``wmss.apply_wmss``: the fused loss for any Hugging Face causal LM pair; ``wmss.WMSSTrainer``
  trains the pair with ``transformers.Trainer``; ``wmss.pipeline`` runs the whole recipe.

The package in layers, each a folder (``wmss_kernels``, beside it, holds the Triton kernels):

* ``wmss/loss/``: the fused loss, its options and its engines (no Hugging Face);
* ``wmss/hf/``: the Hugging Face integration (``apply_wmss``, ``WMSSTrainer``);
* ``wmss/recipe/``: the recipe and its data (data files, WD-DS selection, the pipeline, the demo);
* ``wmss/commands/``: the ``wmss`` command line.

See ``docs/design.md`` for the method (section 1), the fused computation (section 2), the
engine contract (section 3) and the memory bounds and precision rules (section 4).
Names that need transformers are imported on first use, so ``import wmss`` stays light.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .loss import (FusedWMSSLoss, LogitStats, LossOptions, TokenStats, fused_loss, logit_stats,
                   token_entropy)

__version__ = "0.1.0"

_LAZY = {
    "apply_wmss": ("wmss.hf.pair", "apply_wmss"),
    "WMSSPair": ("wmss.hf.pair", "WMSSPair"),
    "WMSSTrainer": ("wmss.hf.trainer", "WMSSTrainer"),
    "WMSSSFTTrainer": ("wmss.hf.trainer", "WMSSSFTTrainer"),
    "training_arguments": ("wmss.hf.trainer", "training_arguments"),
    "selection": ("wmss.recipe.selection", None),
    "pipeline": ("wmss.recipe.pipeline", None),
}

# Modules that users import by these names (SPEC, README), kept importable where they now live.
_MODULE_ALIASES = {
    "wmss.selection": "wmss.recipe.selection",
    "wmss.pipeline": "wmss.recipe.pipeline",
    "wmss.trainer": "wmss.hf.trainer",
    "wmss.pair": "wmss.hf.pair",
}

__all__ = ["FusedWMSSLoss", "LogitStats", "LossOptions", "TokenStats", "__version__",
           "fused_loss", "logit_stats", "token_entropy", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module 'wmss' has no attribute {name!r}")


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import wmss.selection`` (and the other names of ``_MODULE_ALIASES``, and their
    submodules) gives the module where it lives: one module object under two names, so patching
    either patches both."""

    def find_spec(self, name, path=None, target=None):
        if _real_name(name) is None:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        module = importlib.import_module(_real_name(spec.name))
        self._own_spec = module.__spec__  # the import system sets __spec__ to the alias's
        return module

    def exec_module(self, module):
        module.__spec__ = self._own_spec  # already executed under its own name


def _real_name(name: str):
    """Where the module an old name (or a submodule of one: ``wmss.selection.flow``) lives."""
    for alias, real in _MODULE_ALIASES.items():
        if name == alias or name.startswith(alias + "."):
            return real + name[len(alias):]
    return None


# First on the path: a directory left at an old place (e.g. a stale __pycache__) must not
# shadow the real module with an empty namespace package.
if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
