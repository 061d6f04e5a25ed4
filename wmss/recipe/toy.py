"""Tiny models and a character tokenizer, built locally: the demo and the tests download nothing."""

from __future__ import annotations

import string

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
DEFAULT_ALPHABET = string.digits + "+-*=?: " + string.ascii_letters + ".,!<>|/\n"

# A minimal chat template: "<|role|>content<eos>" per message; generation starts "<|assistant|>".
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast``: one token per character of ``alphabet``.

    Special tokens ``<pad> <bos> <eos> <unk>`` take ids 0-3; a BOS is prepended; unknown
    characters map to ``<unk>``. It saves and loads like any HF tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(model_type: str = "llama", vocab_size: int = 96, hidden_size: int = 64,
                   num_layers: int = 2, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised transformers causal LM of ``model_type`` at toy size (float32).

    ``overrides`` go to the config (e.g. ``tie_word_embeddings=True``, ``final_logit_softcapping``).
    """
    heads = max(2, hidden_size // 16)
    config = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                  head_dim=hidden_size // heads, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    return model.float()
