"""A tiny WMSS pair and data set shared by the trainer tests and their torchrun worker."""

import torch
from transformers import TrainerCallback

import wmss
from wmss.toy import tiny_causal_lm

VOCAB = 61


def make_pair(train_weak: bool = True, tie: bool = True):
    strong = tiny_causal_lm("qwen3", vocab_size=VOCAB, hidden_size=32, seed=1,
                            tie_word_embeddings=tie)
    weak = tiny_causal_lm("qwen3", vocab_size=VOCAB, hidden_size=32, seed=2,
                          tie_word_embeddings=tie)
    return wmss.apply_wmss(strong, weak, lam=0.4, train_weak=train_weak)


def examples(count: int = 8) -> list[dict]:
    """Examples of different lengths and supervision, so per-batch means differ from the global
    token mean; the first label is supervised too (it must not be counted: it is shifted away)."""
    g = torch.Generator().manual_seed(123)
    data = []
    for i in range(count):
        length = 6 + (5 * i) % 9
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = i % 4
        data.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return data


def snapshot(pair) -> dict:
    return {name: p.detach().clone() for name, p in pair.named_parameters()}


class GradientCapture(TrainerCallback):
    """Keeps the gradients Trainer is about to apply (after accumulation and DDP averaging)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        pair = getattr(model, "module", model)  # DDP wraps the pair
        self.grads = {n: p.grad.detach().clone() for n, p in pair.named_parameters()
                      if p.grad is not None}
