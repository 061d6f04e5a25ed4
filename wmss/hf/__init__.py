"""Hugging Face integration: the fused loss for any pair of transformers causal LMs.

* ``models.py``: what the loss needs from a causal LM (its final hidden states and lm head,
  ``LMHead``), router losses of mixture-of-experts models, loading;
* ``batches.py``: padding, completion-only labels and the label shift;
* ``pair.py``: ``apply_wmss`` and ``WMSSPair``, the two models behind one forward;
* ``lora.py``: a LoRA pair on one base model (the weak model as a view of the strong PEFT model);
* ``trainer.py``: ``WMSSTrainer`` (a ``transformers.Trainer`` for the pair), ``WMSSSFTTrainer``,
  checkpoints that resume only when complete.
"""
