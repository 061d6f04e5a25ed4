"""Training data: JSONL records -> tokenised examples with completion-only labels -> padded batches.

A record is one JSON object per line, in one of three forms:

* ``{"prompt": "...", "completion": "..."}``: only the completion is supervised;
* ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``: the
  tokenizer's chat template renders the conversation; only assistant turns are supervised;
* ``{"text": "..."}``: every token is supervised.

An encoded example is a dict with ``input_ids`` and ``labels`` (lists of ints, equal length);
``labels`` holds ``IGNORE_INDEX`` on unsupervised tokens and is aligned with ``input_ids`` (HF
convention: the model shifts it). Sequences longer than ``max_length`` are cut at the end.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

import torch

from .defaults import IGNORE_INDEX, MAX_LENGTH


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; raises ``ValueError`` naming the file and line of a malformed record."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _chat_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True,
                                        add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def encode_record(record: dict, tokenizer, max_length: int = MAX_LENGTH,
                  where: str = "record") -> dict:
    """Tokenise one record into ``{"input_ids", "labels"}`` (see module doc)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m
                                                     for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{where}: chat messages need a tokenizer with a chat template")
        input_ids, labels = [], []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
            upto = _chat_ids(tokenizer, messages[:i + 1], add_generation_prompt=False)
            if upto[:len(prefix)] != prefix or upto[:len(input_ids)] != input_ids:
                raise ValueError(f"{where}: the chat template does not render conversations "
                                 "incrementally; use prompt/completion records instead")
            labels += [IGNORE_INDEX] * (len(prefix) - len(input_ids)) + upto[len(prefix):]
            input_ids = upto
        if not input_ids:
            input_ids = _chat_ids(tokenizer, messages, add_generation_prompt=False)
            labels = [IGNORE_INDEX] * len(input_ids)
    elif "prompt" in record and "completion" in record:
        prompt = _ids(tokenizer, str(record["prompt"]), add_special_tokens=True)
        completion = _ids(tokenizer, str(record["completion"]), add_special_tokens=False)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and (not completion or completion[-1] != eos):
            completion.append(eos)
        input_ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    elif "text" in record:
        input_ids = _ids(tokenizer, str(record["text"]), add_special_tokens=True)
        labels = list(input_ids)
    else:
        raise ValueError(f"{where}: expected 'prompt' and 'completion', 'messages', or 'text'; "
                         f"got keys {sorted(record)}")
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def encode_records(records: Iterable[dict], tokenizer, max_length: int = MAX_LENGTH) -> list[dict]:
    """Tokenise every record (``encode_record``); errors name the record's position."""
    return [encode_record(record, tokenizer, max_length, where=f"record {i}")
            for i, record in enumerate(records)]


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
