"""wmss.data: JSONL records become examples whose labels supervise exactly the completion."""

import json

import pytest
import torch

from wmss.data import Collator, collate, encode_record, encode_records, load_jsonl, supervised_tokens
from wmss.toy import char_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def test_prompt_completion_supervises_the_completion_and_eos(tokenizer):
    example = encode_record({"prompt": "12+3=", "completion": "15"}, tokenizer)
    ids, labels = example["input_ids"], example["labels"]
    assert tokenizer.decode(ids) == "<bos>12+3=15<eos>"
    supervised = [t for t, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(supervised) == "15<eos>"
    assert supervised_tokens(example) == 3


def test_chat_messages_supervise_every_assistant_turn_only(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2"},
                {"role": "assistant", "content": "4"}]
    example = encode_record({"messages": messages}, tokenizer)
    ids, labels = example["input_ids"], example["labels"]
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    supervised = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    assert supervised == "yo<eos>4<eos>"


def test_text_records_are_fully_supervised_and_long_ones_truncated(tokenizer):
    example = encode_record({"text": "abcdefgh"}, tokenizer, max_length=5)
    assert example["labels"] == example["input_ids"] and len(example["input_ids"]) == 5


def test_malformed_records_name_their_position(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="record 1: expected 'prompt' and 'completion'"):
        encode_records([{"text": "a"}, {"question": "?"}], tokenizer)
    with pytest.raises(ValueError, match="'messages' must be a list"):
        encode_record({"messages": "hello"}, tokenizer)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_jsonl(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_collate_right_pads_and_masks(tokenizer):
    examples = encode_records([{"prompt": "1+1=", "completion": "2"},
                               {"prompt": "10+10=", "completion": "20"}], tokenizer)
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape == (2, 16)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == -100).all() and (batch["input_ids"][row, n:] == 0).all()
    assert collate(examples, 0)["labels"].dtype == torch.long
