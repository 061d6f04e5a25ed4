"""Training data: JSONL records -> tokenised examples with completion-only labels.

A record is one JSON object per line of a UTF-8 file (a byte-order mark at the start is accepted;
blank lines are skipped), in exactly one of three forms:

* ``{"prompt": "...", "completion": "..."}``: only the completion is supervised, followed by the
  tokenizer's EOS (when it has one). An empty completion therefore supervises the EOS alone: the
  model learns to stop right after the prompt;
* ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``: the
  tokenizer's chat template renders the conversation; only assistant turns are supervised, each
  from the end of the template's generation prompt before it (for a conversation that opens with
  an assistant turn, the template's rendering of no messages). Roles are whatever the template
  accepts (system, user, assistant, tool, ...); turns after the last assistant turn are left out;
* ``{"text": "..."}``: every token is supervised.

``prompt``, ``completion``, ``text`` and each message's ``role`` and ``content`` must be strings;
other keys of a record (an id, a source, ...) are ignored. ``NaN``/``Infinity`` (which Python's
``json`` would accept) and duplicate keys are refused. Every problem with a record is a
``ValueError`` naming the file and line (``path:line``), or ``record i`` for records passed as a
list, and the field at fault, raised before anything is tokenised; a bad ``max_length`` or
tokenizer is a ``TypeError``/``ValueError`` naming it.

A record with nothing supervised (an empty ``text``, a conversation without an assistant turn, a
prompt that fills ``max_length``) is legal: it counts 0 supervised tokens, so selection scores it
0 and never draws it. A record that encodes to no token at all is refused (a model cannot read it).

An encoded example is a dict with ``input_ids`` and ``labels`` (lists of ints, equal length);
``labels`` holds ``IGNORE_INDEX`` on unsupervised tokens and is aligned with ``input_ids`` (HF
convention: the model shifts it). Sequences longer than ``max_length`` are cut at the end.
``wmss.hf.batches`` pads them into batches.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import numbers
import os
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from ..defaults import IGNORE_INDEX, MAX_LENGTH

# The three record forms, by the key that announces each; a record holds exactly one of them.
PROMPT_KEYS = ("prompt", "completion")
MESSAGES_KEY = "messages"
TEXT_KEY = "text"
ASSISTANT_ROLE = "assistant"  # the supervised role of a conversation
# The shortest sequence with a supervised next-token target (after the HF shift).
MIN_MAX_LENGTH = 2
# Bytes read at a time by data_sha256.
HASH_CHUNK_BYTES = 1 << 20
# JSON's whitespace (RFC 8259): a line of nothing else is blank.
JSON_WHITESPACE = " \t\r\n"


@dataclass(frozen=True)
class Record:
    """One record of a JSONL file: the parsed object (``fields``) and where it was read."""

    fields: dict
    path: str
    line: int  # 1-based, counting every line of the file (blank ones too)

    @property
    def where(self) -> str:
        """``path:line``, as error messages name the record."""
        return f"{self.path}:{self.line}"


class _RefusedJSON(ValueError):
    """JSON that Python's parser accepts but a training record may not hold."""


def _refuse_constant(name: str):
    raise _RefusedJSON(f"{name} is not a JSON value")


def _object_without_duplicates(pairs: list) -> dict:
    record = {}
    for key, value in pairs:
        if key in record:
            raise _RefusedJSON(f"duplicate key {key!r}")
        record[key] = value
    return record


def _json_type(value) -> str:
    """The JSON name of a value's type, for error messages about what a record holds."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, numbers.Number):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_string(where: str, field: str, value) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field} must be a string, got {_json_type(value)}")
    try:  # JSON's \ud800-style escapes can spell lone surrogates, which are no text to tokenise
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{where}: {field} holds an unpaired surrogate (an invalid \\u escape "
                         f"at character {error.start + 1}), which is not text") from None


def _check_record(record, where: str) -> str:
    """The record's form (``"prompt"``, ``"messages"`` or ``"text"``), its fields checked."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {_json_type(record)}")
    forms = [form for form, keys in (("prompt", PROMPT_KEYS), ("messages", (MESSAGES_KEY,)),
                                     ("text", (TEXT_KEY,)))
             if any(key in record for key in keys)]
    if not forms:
        raise ValueError(f"{where}: expected 'prompt' and 'completion', 'messages', or 'text'; "
                         f"got keys {sorted(record)}")
    if len(forms) > 1:
        keys = sorted(k for k in (*PROMPT_KEYS, MESSAGES_KEY, TEXT_KEY) if k in record)
        raise ValueError(f"{where}: a record is one of prompt/completion, messages or text, and "
                         f"this one has {keys}: which would be trained on is ambiguous")
    form = forms[0]
    if form == "prompt":
        for key in PROMPT_KEYS:
            if key not in record:
                other = next(k for k in PROMPT_KEYS if k != key)
                raise ValueError(f"{where}: '{other}' needs a '{key}'")
            _check_string(where, f"'{key}'", record[key])
    elif form == "text":
        _check_string(where, f"'{TEXT_KEY}'", record[TEXT_KEY])
    else:
        messages = record[MESSAGES_KEY]
        if not isinstance(messages, list):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} "
                            f"objects, got {_json_type(messages)}")
        if not messages:
            raise ValueError(f"{where}: 'messages' is empty")
        for j, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"{where}: messages[{j}] must be a {{'role', 'content'}} object, "
                                f"got {_json_type(message)}")
            for key in ("role", "content"):
                if key not in message:
                    raise ValueError(f"{where}: messages[{j}] has no '{key}'")
                _check_string(where, f"messages[{j}]['{key}']", message[key])
            if not message["role"].strip():
                raise ValueError(f"{where}: messages[{j}]['role'] is empty")
    return form


def _check_max_length(max_length) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
    if max_length < MIN_MAX_LENGTH:
        raise ValueError(f"max_length must be at least {MIN_MAX_LENGTH} (a supervised "
                         f"next-token target needs two tokens), got {max_length}")
    return int(max_length)


def _check_tokenizer(tokenizer) -> None:
    if not callable(tokenizer):
        raise TypeError("tokenizer must be a Hugging Face tokenizer (called as "
                        f"tokenizer(text, add_special_tokens=...)), got {type(tokenizer).__name__}")


def _check_chat_tokenizer(tokenizer, where: str) -> None:
    if (not callable(getattr(tokenizer, "apply_chat_template", None))
            or getattr(tokenizer, "chat_template", None) is None):
        raise ValueError(f"{where}: chat messages need a tokenizer with a chat template")


def read_records(path: Union[str, os.PathLike]) -> list[Record]:
    """Read and check a JSONL file: one ``Record`` per non-blank line, in file order.

    Raises ``ValueError`` naming ``path:line`` for the first bad line (with the byte offset of
    bytes that are not UTF-8, or the field at fault), or if the file holds no record. The fields
    are checked as ``encode_record`` checks them.
    """
    path = os.fspath(path)
    records, offset = [], 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            start = offset
            offset += len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at "
                                 f"column {error.start + 1}, file offset "
                                 f"{start + error.start})") from None
            if not text.strip(JSON_WHITESPACE):
                continue
            try:
                fields = json.loads(text, parse_constant=_refuse_constant,
                                    object_pairs_hook=_object_without_duplicates)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column "
                                 f"{error.colno})") from None
            except _RefusedJSON as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            except RecursionError:
                raise ValueError(f"{where}: nested too deeply to be a record") from None
            if not isinstance(fields, dict):
                raise ValueError(f"{where}: each line must be a JSON object, got "
                                 f"{_json_type(fields)}")
            _check_record(fields, where)
            records.append(Record(fields, path, number))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def load_jsonl(path: Union[str, os.PathLike]) -> list[dict]:
    """The records of a JSONL file as dicts (``read_records`` without the line numbers)."""
    return [record.fields for record in read_records(path)]


def load_dataset_file(path: Union[str, os.PathLike], tokenizer,
                      max_length: int = MAX_LENGTH) -> list[dict]:
    """Read, check and tokenise a JSONL file (``read_records`` then ``encode_records``).

    Every error names ``path:line``; the arguments are checked before the file is read, and every
    record before any is tokenised.
    """
    _check_max_length(max_length)
    _check_tokenizer(tokenizer)
    return encode_records(read_records(path), tokenizer, max_length)


def data_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's bytes, as 64 lowercase hex digits (read in chunks, so any size).

    What a run stores to notice that the data file at the same path was edited since.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _empty_conversation_ids(tokenizer) -> list[int]:
    """The template's rendering of no messages plus the generation prompt, tokenised.

    ``apply_chat_template`` refuses an empty conversation, so this renders it as that method
    does (same renderer, the special tokens as template variables) and tokenises the text without
    adding special tokens (the template writes its own).
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[[]],
                                        chat_template=tokenizer.get_chat_template(),
                                        add_generation_prompt=True,
                                        **tokenizer.special_tokens_map)
    return _ids(tokenizer, rendered[0], add_special_tokens=False)


def _chat_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool,
              where: str) -> list[int]:
    if not messages:
        try:
            return _empty_conversation_ids(tokenizer)
        except Exception as error:  # the template's or transformers' own; reported with the place
            raise ValueError(
                f"{where}: the conversation opens with an assistant turn, and the chat template "
                f"cannot render the empty conversation before it ({type(error).__name__}: "
                f"{error}); start it with a system or user turn") from error
    try:
        ids = tokenizer.apply_chat_template(list(messages), tokenize=True,
                                            add_generation_prompt=add_generation_prompt)
    except Exception as error:  # e.g. a template's raise_exception("roles must alternate")
        raise ValueError(f"{where}: the chat template refuses this conversation "
                         f"({type(error).__name__}: {error})") from error
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def _encode_messages(messages: list, tokenizer, where: str) -> tuple[list[int], list[int]]:
    input_ids, labels = [], []
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT_ROLE:
            continue
        prefix = _chat_ids(tokenizer, messages[:i], True, where)
        upto = _chat_ids(tokenizer, messages[:i + 1], False, where)
        if upto[:len(prefix)] != prefix or upto[:len(input_ids)] != input_ids:
            raise ValueError(f"{where}: the chat template does not render conversations "
                             "incrementally; use prompt/completion records instead")
        labels += [IGNORE_INDEX] * (len(prefix) - len(input_ids)) + upto[len(prefix):]
        input_ids = upto
    if not input_ids:  # no assistant turn: the whole conversation, nothing supervised
        input_ids = _chat_ids(tokenizer, messages, False, where)
        labels = [IGNORE_INDEX] * len(input_ids)
    return input_ids, labels


def _encode(record: dict, form: str, tokenizer, max_length: int, where: str) -> dict:
    if form == "messages":
        input_ids, labels = _encode_messages(record[MESSAGES_KEY], tokenizer, where)
    elif form == "prompt":
        prompt = _ids(tokenizer, record["prompt"], add_special_tokens=True)
        completion = _ids(tokenizer, record["completion"], add_special_tokens=False)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and (not completion or completion[-1] != eos):
            completion.append(eos)
        input_ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    else:
        input_ids = _ids(tokenizer, record[TEXT_KEY], add_special_tokens=True)
        labels = list(input_ids)
    if not input_ids:
        raise ValueError(f"{where}: the record encodes to no token at all (an empty text, and "
                         "the tokenizer adds no BOS): a model cannot read it")
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def encode_record(record: dict, tokenizer, max_length: int = MAX_LENGTH,
                  where: str = "record") -> dict:
    """Tokenise one record into ``{"input_ids", "labels"}`` (see module doc).

    ``where`` names the record in error messages (``path:line``, ``record i``).
    """
    max_length = _check_max_length(max_length)
    _check_tokenizer(tokenizer)
    form = _check_record(record, where)
    if form == "messages":
        _check_chat_tokenizer(tokenizer, where)
    return _encode(record, form, tokenizer, max_length, where)


def encode_records(records: Iterable[Union[dict, Record]], tokenizer,
                   max_length: int = MAX_LENGTH) -> list[dict]:
    """Tokenise every record (``encode_record``), all of them checked before any is tokenised.

    ``records`` are dicts (errors name ``record i``, the 0-based position) or ``Record``s from
    ``read_records`` (errors name ``path:line``).
    """
    max_length = _check_max_length(max_length)
    _check_tokenizer(tokenizer)
    checked = []
    for i, record in enumerate(records):
        where = record.where if isinstance(record, Record) else f"record {i}"
        fields = record.fields if isinstance(record, Record) else record
        form = _check_record(fields, where)
        if form == "messages":
            _check_chat_tokenizer(tokenizer, where)
        checked.append((fields, form, where))
    return [_encode(fields, form, tokenizer, max_length, where) for fields, form, where in checked]
