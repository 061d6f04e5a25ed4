"""Batches for Hugging Face causal LMs: padding, completion-only labels, the label shift.

Encoded examples (``wmss.recipe.data``) are dicts with ``input_ids`` and ``labels`` (lists of
ints of equal length); ``labels`` holds ``IGNORE_INDEX`` on unsupervised tokens and is aligned
with ``input_ids``, as HF models expect (they shift it).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..defaults import IGNORE_INDEX


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF causal-LM shift, kept aligned with the hidden states: position ``t`` predicts
    ``labels[..., t + 1]`` and the last position predicts nothing. Shifting the labels instead of
    slicing ``hidden[:, :-1]`` spares a copy of the ``[batch, seq, d]`` hidden states."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def supervised_tokens(example: dict) -> int:
    """Number of supervised next-token targets (after the HF shift) of an encoded example."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def collate(examples: Sequence[dict], pad_token_id: int, *,
            pad_to_multiple_of: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    length = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = {
        "input_ids": torch.full((len(examples), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
    }
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
    return batch


class Collator:
    """``collate`` as a picklable callable for ``DataLoader``/``Trainer`` (``data_collator=``).

    Accepts examples with extra keys (they are dropped).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, falling back to EOS (and 0) as HF training scripts do."""
    for candidate in (getattr(tokenizer, "pad_token_id", None),
                      getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0
