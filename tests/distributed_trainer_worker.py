"""WMSSTrainer under FSDP2 or DeepSpeed ZeRO-3 (or DDP), run by tests/test_distributed_trainer.py
under ``torchrun`` with 2 CPU processes over gloo.

``python distributed_trainer_worker.py OUT MODE`` with MODE one of ``fsdp-full``,
``fsdp-sharded`` (FSDP2, ``FULL_STATE_DICT`` / ``SHARDED_STATE_DICT``), ``zero3-gather``,
``zero3-sharded`` (ZeRO-3 with / without ``stage3_gather_16bit_weights_on_model_save``), or
``ddp-reentrant`` (DDP with reentrant activation checkpointing).

For the sharded modes: run 1 trains ``STEPS`` steps saving a checkpoint every ``SAVE_EVERY``,
then ``trainer.save_model(OUT/final)``; run 2 (a new pair and Trainer in the same processes)
resumes from ``checkpoint-SAVE_EVERY`` and trains to ``STEPS``. Rank 0 writes ``OUT/result.pt``:
both runs' final weights, gathered (``wmss.hf.distributed.full_state_dict``), and every file of
the resumed checkpoint. Each optimizer step sees the whole data set (2 processes x 2 examples), so
the result does not depend on the sampler's order and equals one process on the whole batch.

On CPU, accelerate turns FSDP off: ``AcceleratorState`` keeps the FSDP plugin only for GPU-like
distributed types (accelerate/state.py: MULTI_GPU, MULTI_XPU, ...; not MULTI_CPU) and prepares
DDP instead. ``enable_fsdp_on_cpu`` wraps ``AcceleratorState.__init__`` to finish what that GPU
branch does (``distributed_type = FSDP``, ``fsdp_plugin = plugin``) for MULTI_CPU too; everything
else (Trainer's FSDP plugin from ``fsdp``/``fsdp_config``, accelerate's ``fsdp2_prepare_model``,
its FSDP checkpoint save and load) is the code a GPU run takes.

ZeRO-3 on CPU: DeepSpeed's CPU accelerator. accelerate prepares DeepSpeed only when not told
``cpu`` (``use_cpu``), and then looks for a GPU-like device only (``PartialState._prepare_backend``
answers "no distributed training" on a CPU machine). So the process group is initialised over
gloo before Trainer (DeepSpeed would pick the CPU accelerator's ccl backend; accelerate and
DeepSpeed adopt an initialised group), and ``enable_deepspeed_on_cpu`` makes ``_prepare_backend``
answer what its CPU branch answers (gloo, MULTI_CPU) where it would answer "none"; accelerate then
switches to DeepSpeed as on a GPU machine (``ACCELERATE_USE_DEEPSPEED``, set by Trainer). The
pair is built whole and partitioned by DeepSpeed when Trainer prepares it (models loaded under
``zero.Init`` are tests/test_zero3.py's and the pipeline's); the pair's own ``FusedHeads`` module
is where DeepSpeed gathers the lm heads for the loss.
"""

import os
import sys

import torch

PROCESSES, STEPS, SAVE_EVERY, BATCH = 2, 4, 2, 2
# Shared with the test's one-process run. SGD with momentum: the resumed run needs the
# checkpoint's optimizer state, and the weights stay linear in the gradients (Adam's normalised
# steps would turn float rounding in near-zero gradients into visible weight differences).
OPTIMIZER = dict(learning_rate=0.5, optim="sgd", optim_args="momentum=0.9",
                 lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
MODE = None  # set by main from the command line
LAYER_CLASS = "Qwen3DecoderLayer"


def enable_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP  # as accelerate's GPU branch sets them
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init


def enable_deepspeed_on_cpu() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = original(self, cpu, sagemaker_dp, backend)
        if kind == DistributedType.NO and torch.distributed.is_initialized():
            return "gloo", DistributedType.MULTI_CPU  # the CPU branch's choice, for DeepSpeed
        return chosen, kind

    PartialState._prepare_backend = prepare_backend


def arguments(output_dir: str):
    from wmss.hf.trainer import training_arguments

    common = dict(per_device_train_batch_size=BATCH, max_steps=STEPS, **OPTIMIZER,
                  save_strategy="steps", save_steps=SAVE_EVERY,
                  disable_tqdm=True, seed=0, logging_steps=1, ddp_backend="gloo")
    if MODE.startswith("fsdp"):
        state_dict_type = "FULL_STATE_DICT" if MODE == "fsdp-full" else "SHARDED_STATE_DICT"
        return training_arguments(output_dir, use_cpu=True, fsdp="full_shard auto_wrap",
                                  fsdp_config={"version": 2,
                                               "transformer_layer_cls_to_wrap": [LAYER_CLASS],
                                               "state_dict_type": state_dict_type,
                                               "reshard_after_forward": True}, **common)
    if MODE.startswith("zero3"):
        config = {"zero_optimization": {
            "stage": 3, "stage3_gather_16bit_weights_on_model_save": MODE == "zero3-gather",
            "stage3_param_persistence_threshold": 0},  # partition every tensor, however small
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
        return training_arguments(output_dir, deepspeed=config, **common)
    if MODE == "ddp-reentrant":
        common.update(max_steps=1, save_strategy="no")
        return training_arguments(output_dir, use_cpu=True, activation_checkpointing=True,
                                  gradient_checkpointing_kwargs={"use_reentrant": True}, **common)
    raise ValueError(f"unknown mode {MODE!r}")


def build_pair():
    from trainer_fixtures import make_pair

    return make_pair(backend="torch")


def trainer_for(pair, output_dir: str):
    from trainer_fixtures import GradientCapture, examples

    from wmss.hf.batches import Collator
    from wmss.hf.trainer import WMSSTrainer

    capture = GradientCapture()
    trainer = WMSSTrainer(pair, arguments(output_dir), train_dataset=examples(PROCESSES * BATCH),
                          data_collator=Collator(0), callbacks=[capture])
    return trainer, capture


def main(out: str, mode: str) -> None:
    global MODE
    MODE = mode
    if MODE.startswith("fsdp"):
        enable_fsdp_on_cpu()
    if MODE.startswith("zero3"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.distributed.init_process_group("gloo")
        enable_deepspeed_on_cpu()
    from wmss.hf.distributed import full_state_dict, is_main_process

    run_dir = os.path.join(out, "run")
    # Both pairs before any TrainingArguments: with a ZeRO-3 config alive, transformers builds
    # models under zero.Init (partitioned at birth), which apply_wmss cannot check yet.
    pair, resumed_pair = build_pair(), build_pair()
    trainer, capture = trainer_for(pair, run_dir)
    trainer.train()
    result = {"mode": MODE, "fsdp": trainer.is_fsdp_enabled,
              "deepspeed": trainer.is_deepspeed_enabled,
              "find_unused": trainer.args.ddp_find_unused_parameters}
    if MODE == "ddp-reentrant":
        result["grads"] = capture.grads
    else:
        result["trained"] = full_state_dict(trainer.model)
        trainer.save_model(os.path.join(out, "final"))
        checkpoint = os.path.join(run_dir, f"checkpoint-{SAVE_EVERY}")
        result["checkpoint_files"] = sorted(
            os.path.relpath(os.path.join(root, name), checkpoint)
            for root, _, names in os.walk(checkpoint) for name in names)
        resumed, _ = trainer_for(resumed_pair, os.path.join(out, "resumed"))
        resumed.train(resume_from_checkpoint=checkpoint)
        result["resumed"] = full_state_dict(resumed.model)
        result["resumed_step"] = resumed.state.global_step
    if is_main_process():
        torch.save(result, os.path.join(out, "result.pt"))
    # As tests/ddp_worker.py: past the last collective, exit without interpreter finalization.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
