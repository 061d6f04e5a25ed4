"""What the pipeline tests train on: a tiny saved base model and a JSONL of arithmetic records."""

import json

from wmss.recipe.toy import char_tokenizer, tiny_causal_lm


def prompt_records(count: int) -> list[dict]:
    """``{"prompt": "a+a=", "completion": "2a"}`` for ``a`` in ``range(count)``."""
    return [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(count)]


def chat_records(count: int) -> list[dict]:
    """``{"messages": [user "a*2", assistant "2a"]}`` for ``a`` in ``range(count)``."""
    return [{"messages": [{"role": "user", "content": f"{a}*2"},
                          {"role": "assistant", "content": str(2 * a)}]} for a in range(count)]


def tiny_workspace(root, records: list[dict]) -> tuple[str, str]:
    """``root/base``: a one-layer llama (hidden size 32) with the character tokenizer;
    ``root/data.jsonl``: ``records``. Returns both paths."""
    tokenizer = char_tokenizer()
    base = root / "base"
    tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=1,
                   seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = root / "data.jsonl"
    with open(data, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return str(base), str(data)
