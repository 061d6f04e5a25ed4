"""wmss.recipe.data and wmss.hf.batches: JSONL records become examples whose labels supervise
exactly the completion, and batches keep them so."""

import json

import pytest
import torch

from wmss.hf.batches import Collator, collate, supervised_tokens
from wmss.recipe import data
from wmss.recipe.data import encode_record, encode_records, load_jsonl
from wmss.recipe.toy import char_tokenizer


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
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
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


# ---- records are checked before any work, and errors name the file, the line and the field ----

GOOD_LINE = json.dumps({"text": "ok"})


def write_lines(path, *lines: str):
    """A JSONL file whose third line is ``lines[0]`` (a good line and a blank line come first)."""
    path.write_text("\n".join([GOOD_LINE, "", *lines]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("line, message", [
    ('{"prompt": null, "completion": "2"}', "'prompt' must be a string, got null"),
    ('{"prompt": "1+1=", "completion": true}',
     r"'completion' must be a string, got a boolean \(true\)"),
    ('{"prompt": "1+1=", "completion": 2}',
     r"'completion' must be a string, got a number \(2\)"),
    ('{"text": ["a", "b"]}', "'text' must be a string, got an array"),
    ('{"text": {"a": 1}}', "'text' must be a string, got an object"),
    ('{"messages": "hello"}',
     "'messages' must be a list of {'role', 'content'} objects, got a string"),
    ('{"messages": []}', "'messages' is empty"),
    ('{"messages": ["hi"]}', r"messages\[0\] must be a {'role', 'content'} object, got a string"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\] has no 'content'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}',
     r"messages\[1\]\['content'\] must be a string, got null"),
    ('{"messages": [{"role": 1, "content": "a"}]}', r"messages\[0\]\['role'\] must be a string"),
    ('{"messages": [{"role": " ", "content": "a"}]}', r"messages\[0\]\['role'\] is empty"),
    ('{"prompt": "1+1="}', "'prompt' needs a 'completion'"),
    ('{"prompt": "1+1=", "completion": "2", "text": "1+1=2"}',
     r"a record is one of prompt/completion, messages or text, and this one has "
     r"\['completion', 'prompt', 'text'\]: which would be trained on is ambiguous"),
    ('{"text": "a", "messages": [{"role": "user", "content": "a"}]}',
     r"a record is one of .*, and this one has \['messages', 'text'\]"),
])
def test_fields_of_the_wrong_type_are_refused_naming_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", line)
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: {message}"):
        load_jsonl(path)
    with pytest.raises(ValueError, match=rf"^record 1: {message}"):
        encode_records([{"text": "ok"}, json.loads(line)], char_tokenizer())


@pytest.mark.parametrize("line, message", [
    ('{"text": "a", "score": NaN}', "NaN is not a JSON value"),
    ('{"text": "a", "score": [1, Infinity]}', "Infinity is not a JSON value"),
    ('{"text": "a", "meta": {"score": -Infinity}}', "-Infinity is not a JSON value"),
    ('{"text": "a", "text": "b"}', "duplicate key 'text'"),
])
def test_nan_infinity_and_duplicate_keys_are_invalid_json(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", line)
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: not valid JSON \({message}\)"):
        load_jsonl(path)


def test_bytes_that_are_not_utf8_name_the_line_and_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    # Line 3 starts at byte 16; 0xe9 is its 14th byte.
    with pytest.raises(ValueError, match=r"latin1.jsonl:3: not valid UTF-8 \(byte 0xe9 at "
                                         r"column 14, file offset 29\)"):
        load_jsonl(path)


def test_a_utf8_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\r\n\r\n{"text": "b"}\r\n')
    records = data.read_records(path)
    assert [(r.fields, r.line) for r in records] == [({"text": "caf\u00e9"}, 1),
                                                     ({"text": "b"}, 3)]
    assert load_jsonl(path) == [{"text": "caf\u00e9"}, {"text": "b"}]


def test_errors_while_encoding_name_the_file_line_not_the_position(tmp_path, tokenizer):
    no_template = char_tokenizer()
    no_template.chat_template = None
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([GOOD_LINE, "", "", json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})]) + "\n")
    message = "chat messages need a tokenizer with a chat template"
    with pytest.raises(ValueError, match=rf"chat.jsonl:4: {message}"):
        data.load_dataset_file(path, no_template, 64)
    with pytest.raises(ValueError, match=rf"chat.jsonl:4: {message}"):
        encode_records(data.read_records(path), no_template, 64)
    # The same records as a plain list are named by their 0-based position, as before.
    with pytest.raises(ValueError, match=rf"^record 1: {message}"):
        encode_records(load_jsonl(path), no_template, 64)
    assert (data.load_dataset_file(path, tokenizer, 64)
            == encode_records(load_jsonl(path), tokenizer, 64))


def test_a_bad_record_is_refused_before_any_record_is_tokenised(tokenizer):
    calls = []

    def counting_tokenizer(text, add_special_tokens):
        calls.append(text)
        return tokenizer(text, add_special_tokens=add_special_tokens)

    with pytest.raises(ValueError, match=r"record 3: 'text' must be a string, got null"):
        encode_records([{"text": "a"}] * 3 + [{"text": None}], counting_tokenizer)
    assert calls == []


def test_chat_template_failures_name_the_file_line(tmp_path):
    alternating = char_tokenizer()
    alternating.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = write_lines(tmp_path / "chat.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"}]}))
    with pytest.raises(ValueError, match=r"chat.jsonl:3: the chat template refuses this "
                                         r"conversation \(TemplateError: roles must alternate"):
        data.load_dataset_file(path, alternating, 64)


def test_a_conversation_opening_with_an_assistant_turn_supervises_it_from_the_start(tokenizer):
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "2+2"},
                {"role": "assistant", "content": "4"}]
    example = encode_record({"messages": messages}, tokenizer, where="x")
    ids, labels = example["input_ids"], example["labels"]
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    supervised = [t for t, label in zip(ids, labels) if label != -100]
    unsupervised = [t for t, label in zip(ids, labels) if label == -100]
    assert [label for label in labels if label != -100] == supervised
    assert tokenizer.decode(supervised) == "hi<eos>4<eos>"
    assert tokenizer.decode(unsupervised) == "<|assistant|><|user|>2+2<eos><|assistant|>"


def test_an_opening_assistant_turn_is_refused_when_the_template_cannot_render_no_messages(tmp_path):
    # Like many real templates: it reads messages[0], which an empty conversation lacks.
    system_first = char_tokenizer()
    system_first.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|system|>be brief{{ eos_token }}{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = write_lines(tmp_path / "chat.jsonl", json.dumps({"messages": [
        {"role": "assistant", "content": "hi"}]}))
    with pytest.raises(ValueError, match=r"chat.jsonl:3: the conversation opens with an assistant "
                                         r"turn, and the chat template cannot render the empty"):
        data.load_dataset_file(path, system_first, 64)


def test_records_with_nothing_supervised_are_kept_and_count_no_tokens(tmp_path, tokenizer):
    path = tmp_path / "quiet.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"text": ""}, {"prompt": "1+1=", "completion": ""},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": "123456789", "completion": "x"}]))  # the prompt fills max_length
    examples = data.load_dataset_file(path, tokenizer, max_length=6)
    assert [supervised_tokens(e) for e in examples] == [0, 1, 0, 0]
    assert tokenizer.decode(examples[0]["input_ids"]) == "<bos>"
    empty_completion = examples[1]
    supervised = [t for t, label in zip(empty_completion["input_ids"], empty_completion["labels"])
                  if label != -100]
    assert tokenizer.decode(supervised) == "<eos>"


def test_a_record_that_encodes_to_no_token_is_refused(tmp_path):
    from tokenizers import processors

    no_bos = char_tokenizer()
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A",
                                                                            pair="$A $B")
    path = write_lines(tmp_path / "empty.jsonl", '{"text": ""}')
    with pytest.raises(ValueError, match=r"empty.jsonl:3: the record encodes to no token at all"):
        data.load_dataset_file(path, no_bos, 64)


def test_max_length_and_tokenizer_are_checked_before_the_file_is_read(tmp_path, tokenizer):
    missing = tmp_path / "missing.jsonl"
    for max_length, error, message in [(1, ValueError, "max_length must be at least 2"),
                                       (0, ValueError, "max_length must be at least 2"),
                                       (2.5, TypeError, "max_length must be an int, got float"),
                                       (True, TypeError, "max_length must be an int, got bool")]:
        with pytest.raises(error, match=message):
            data.load_dataset_file(missing, tokenizer, max_length)
        with pytest.raises(error, match=message):
            encode_record({"text": "abc"}, tokenizer, max_length)
        with pytest.raises(error, match=message):
            encode_records([{"text": "abc"}], tokenizer, max_length)
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        data.load_dataset_file(missing, None, 64)
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        encode_records([{"text": "abc"}], "gpt2", 64)
    assert len(encode_record({"text": "abc"}, tokenizer, 2)["input_ids"]) == 2


def test_data_sha256_is_the_digest_of_the_whole_file(tmp_path):
    import hashlib

    content = bytes(range(256)) * (3 * data.HASH_CHUNK_BYTES // 256 + 1)  # several chunks
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    assert data.data_sha256(path) == hashlib.sha256(content).hexdigest()
    path.write_bytes(content[:-1] + b"\x00")  # an edit in the last chunk
    assert data.data_sha256(str(path)) == hashlib.sha256(content[:-1] + b"\x00").hexdigest()
    assert data.data_sha256(path) != hashlib.sha256(content).hexdigest()


def test_text_that_is_no_text_is_refused_naming_the_line(tmp_path):
    """A lone surrogate (a legal JSON escape) cannot be tokenised; deep nesting cannot be parsed."""
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: 'text' holds an unpaired surrogate"):
        data.read_records(path)
    path.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: nested too deeply"):
        data.read_records(path)
