"""WMSS pairs under DeepSpeed ZeRO-3 on CPU (gloo), run by tests/test_zero3.py.

``python zero3_worker.py checks OUT``: one process (a 1-process group): ``apply_wmss``'s checks
on models built under ZeRO-3's ``deepspeed.zero.Init`` (HF's ``from_config`` under an
``HfDeepSpeedConfig``); saves what the checks found (``repr`` of each outcome) to ``OUT``.

``torchrun --nproc_per_node=2 zero3_worker.py train OUT CHECKPOINTS``: for each case, the pair of
the checkpoints ``CHECKPOINTS/{tied,untied}-{strong,weak}`` under ``deepspeed.initialize`` at
stage 3, one forward and backward, each process on half of the batch; rank 0 saves the whole
batch's loss, the full gradients (``deepspeed.utils.safe_get_full_grad``) of every trained
parameter, and the strong head's ZeRO status while the weak backbone runs, in that forward and in
a second one. Cases: the models loaded partitioned (``from_pretrained`` under ZeRO-3's
``HfDeepSpeedConfig``: ``zero.Init``), tied and untied heads, the weak model trained or frozen;
and models loaded whole that ``deepspeed.initialize`` partitions.
"""

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from transformers.integrations import HfDeepSpeedConfig

import wmss
from wmss.hf.batches import collate
from wmss.hf.models import load_causal_lm
from wmss.recipe.toy import tiny_causal_lm

# Every parameter is partitioned, however small (by default ZeRO-3 keeps parameters under 1e5
# elements whole on every process, which would leave the tiny heads unpartitioned), and nothing is
# prefetched or kept for a reuse: a parameter is gathered only while a module that uses it runs.
CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                "stage3_model_persistence_threshold": 0,
                                "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0},
          "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}

# (case name, checkpoint prefix, train_weak, loaded partitioned)
CASES = [("tied", "tied", True, True), ("untied", "untied", True, True),
         ("tied-frozen-weak", "tied", False, True),
         ("untied-partitioned-by-initialize", "untied", True, False)]


def outcome(action) -> str:
    try:
        action()
    except ValueError as error:
        return f"ValueError: {error}"
    return "ok"


def checks(out_path: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    keep = HfDeepSpeedConfig(CONFIG)  # from_config builds under zero.Init while it lives

    def model(vocab=61, seed=1, tie=True, **overrides):
        return tiny_causal_lm("qwen3", vocab_size=vocab, hidden_size=32, seed=seed,
                              tie_word_embeddings=tie, **overrides)

    strong, weak, untied = model(), model(seed=2), model(seed=3, tie=False)
    scaled = model(seed=4)
    scaled.config.logits_scaling = 2.0  # Granite's logit scale: Qwen3 does not apply it
    result = {
        "partitioned": tuple(strong.lm_head.weight.shape),
        "tied": outcome(lambda: wmss.apply_wmss(strong, weak)),
        "untied": outcome(lambda: wmss.apply_wmss(untied, weak)),
        "vocabulary": outcome(lambda: wmss.apply_wmss(strong, model(vocab=67, seed=2))),
        "transform": outcome(lambda: wmss.apply_wmss(strong, scaled)),
        "external": sorted(tuple(p.ds_shape) for p in getattr(
            wmss.apply_wmss(untied, weak).fused_heads, "_external_params", {}).values()),
    }
    del keep
    torch.save(result, out_path)


def train_case(prefix: str, checkpoints: str, train_weak: bool, partitioned: bool, batch) -> dict:
    keep = HfDeepSpeedConfig(CONFIG) if partitioned else None  # from_pretrained under zero.Init
    strong, weak = (load_causal_lm(os.path.join(checkpoints, f"{prefix}-{name}"))
                    for name in ("strong", "weak"))
    pair = wmss.apply_wmss(strong, weak, lam=0.4, train_weak=train_weak, backend="torch")
    trained = [(name, p) for name, p in pair.named_parameters() if p.requires_grad]
    # Whether the strong head is gathered while the weak backbone runs (its final norm's forward):
    # the parameter object itself (reading strong.lm_head.weight in an engine forward would make
    # DeepSpeed gather it).
    head, during_backbones = strong.lm_head.weight, []
    weak.model.norm.register_forward_hook(
        lambda *_: during_backbones.append(head.ds_status.name))
    engine, *_ = deepspeed.initialize(
        model=pair, optimizer=torch.optim.SGD([p for _, p in trained], lr=0.0), config=CONFIG)
    rank, world = dist.get_rank(), dist.get_world_size()
    share = {k: v.chunk(world)[rank] for k, v in batch.items()}
    count = (batch["labels"][:, 1:] != -100).sum()  # the whole batch's supervised tokens
    out = engine(**share, num_items_in_batch=count)
    engine.backward(out.loss * world)  # DeepSpeed averages the gradients over processes
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    result = {"loss": loss, "head": tuple(head.shape),
              "grads": {name: safe_get_full_grad(p).clone() for name, p in trained}}
    with torch.no_grad():  # a second forward, on the trace DeepSpeed recorded in the first
        engine(**share, num_items_in_batch=count)
    result["head during backbones"] = during_backbones
    engine.destroy()
    del keep
    return result


def train(out_path: str, checkpoints: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    batch = torch.load(os.path.join(checkpoints, "batch.pt"))
    results = {name: train_case(prefix, checkpoints, train_weak, partitioned, batch)
               for name, prefix, train_weak, partitioned in CASES}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    # As tests/ddp_worker.py: past the last collective, exit without interpreter finalization.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "checks":
        checks(sys.argv[2])
    else:
        train(sys.argv[2], sys.argv[3])
