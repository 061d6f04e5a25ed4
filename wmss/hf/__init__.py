"""Hugging Face integration: the fused loss for any pair of transformers causal LMs.

* ``models.py``: what the loss needs from a causal LM (its final hidden states and lm head,
  ``LMHead``), router losses of mixture-of-experts models, loading;
* ``pair.py``: ``apply_wmss`` and ``WMSSPair``, the two models behind one forward;
* ``trainer.py``: ``WMSSTrainer`` (a ``transformers.Trainer`` for the pair), ``WMSSSFTTrainer``,
  checkpoints that resume only when complete.
"""
