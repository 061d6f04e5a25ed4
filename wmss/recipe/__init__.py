"""The WMSS recipe and its data.

* ``data.py``: JSONL records, chat templates, tokenisation and the collator;
* ``selection/``: WD-DS, the entropy-based choice of the active training set (public as
  ``wmss.selection``);
* ``inspect.py``: the means of the logit statistics over a data set (``wmss inspect``);
* ``pipeline.py``: the whole recipe (SFT warm-up, selection, joint training, K rounds), resumable;
* ``demo.py`` and ``toy.py``: the built-in task and tiny model of ``wmss demo``.
"""
