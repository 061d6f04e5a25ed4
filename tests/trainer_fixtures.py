"""A tiny WMSS pair and data set shared by the trainer tests and their torchrun worker."""

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

import wmss
from wmss.hf.batches import collate
from wmss.defaults import IGNORE_INDEX
from wmss.recipe.toy import tiny_causal_lm

VOCAB = 61


def make_pair(train_weak: bool = True, tie: bool = True, **options):
    """``options`` go to ``wmss.apply_wmss`` (e.g. ``gap_threshold``, ``ignore_index``)."""
    strong = tiny_causal_lm("qwen3", vocab_size=VOCAB, hidden_size=32, seed=1,
                            tie_word_embeddings=tie)
    weak = tiny_causal_lm("qwen3", vocab_size=VOCAB, hidden_size=32, seed=2,
                          tie_word_embeddings=tie)
    return wmss.apply_wmss(strong, weak, lam=0.4, train_weak=train_weak, **options)


def examples(count: int = 8, ignore_index: int = IGNORE_INDEX) -> list[dict]:
    """Examples of different lengths and supervision, so per-batch means differ from the global
    token mean; the first label is supervised too (it must not be counted: it is shifted away)."""
    g = torch.Generator().manual_seed(123)
    data = []
    for i in range(count):
        length = 6 + (5 * i) % 9
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = i % 4
        data.append({"input_ids": ids, "labels": [ignore_index] * prompt + ids[prompt:]})
    return data


class LabelCollator:
    """``wmss.hf.batches.collate`` with labels padded with ``ignore_index`` (a pair's own), and a record
    of every batch it made, in order (Trainer's micro-batches)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index, self.batches = ignore_index, []

    def __call__(self, batch_examples):
        batch = collate(batch_examples, pad_token_id=0)
        batch["labels"][batch["attention_mask"] == 0] = self.ignore_index
        self.batches.append(list(batch_examples))
        return batch


def snapshot(pair) -> dict:
    return {name: p.detach().clone() for name, p in pair.named_parameters()}


@torch.no_grad()
def own_statistics(pair, batch_examples, ignore_index: int = IGNORE_INDEX) -> dict:
    """What the trainer logs, from each model's own forward (its logits and its HF loss) over the
    supervised shifted tokens of ``batch_examples`` taken as one batch: plain cross-entropies,
    mean entropies, and the share of tokens the pair's gap masking mixes."""
    batch = collate(batch_examples, pad_token_id=0)
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    labels[labels == ignore_index] = IGNORE_INDEX  # HF models' loss ignores -100
    supervised = labels[:, 1:] != IGNORE_INDEX
    result, entropies = {}, {}
    for name, model in (("strong", pair.strong), ("weak", pair.weak)):
        result[f"{name}_loss"] = model(input_ids=input_ids, attention_mask=mask,
                                       labels=labels).loss.item()
        logp = F.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
                             .double(), dim=-1)
        entropies[name] = -(logp.exp() * logp).sum(-1)[supervised]
        result[f"entropy_{name}"] = entropies[name].mean().item()
    gap = pair.gap_threshold
    mixed = (torch.ones_like(entropies["weak"], dtype=torch.bool) if gap is None
             else entropies["weak"] - entropies["strong"] >= gap)
    result["mixed_fraction"] = mixed.double().mean().item()
    return result


class GradientCapture(TrainerCallback):
    """Keeps the gradients Trainer is about to apply (after accumulation and DDP averaging)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        pair = getattr(model, "module", model)  # DDP wraps the pair
        self.grads = {n: p.grad.detach().clone() for n, p in pair.named_parameters()
                      if p.grad is not None}
