"""One WMSSTrainer step, run by tests/test_trainer.py under ``torchrun`` (1 or 2 CPU processes).

Every process sees the same 8 examples; Trainer's distributed sampler gives each its share. Rank 0
saves the gradient Trainer applies (after accumulation and DDP's all-reduce) and the log history
for the test.
"""

import os
import sys

import torch

from trainer_fixtures import GradientCapture, examples, make_pair
from wmss.hf.batches import Collator
from wmss.hf.trainer import WMSSTrainer, training_arguments


def main(out_path: str, per_device_batch: int, accumulation: int) -> None:
    pair = make_pair()
    capture = GradientCapture()
    args = training_arguments(
        os.path.join(os.path.dirname(out_path), "ddp-run"), per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, use_cpu=True,
        ddp_backend="gloo", save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1)
    trainer = WMSSTrainer(pair, args, train_dataset=examples(), processing_class=None,
                          data_collator=Collator(0), callbacks=[capture])
    trainer.train()
    if trainer.args.process_index == 0:
        torch.save({"grads": capture.grads, "log_history": trainer.state.log_history}, out_path)
    # Exit without interpreter finalization. The gloo process group's worker threads release
    # each finished collective's tensors themselves, and releasing a tensor Python also sees
    # takes the GIL (seen with torch 2.13). A rank that exits right after its last collective
    # (rank 1, while rank 0 still saves) can finalize the interpreter while a worker still waits
    # for the GIL; Python ends such a thread with pthread_exit, inside a C++ noexcept destructor:
    # std::terminate ("terminate called without an active exception"), SIGABRT, a failed
    # torchrun. destroy_process_group() is no cure: the group dies later, when the DDP model
    # holding it is freed, and its destructor joins the worker threads while holding the GIL
    # the worker waits for (a deadlock, seen 1 in 30). So: every rank past its last collective
    # (the barrier), the result written and closed, output flushed, then os._exit.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
