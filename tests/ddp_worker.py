"""One WMSSTrainer step, run by tests/test_trainer.py under ``torchrun`` (1 or 2 CPU processes).

Every process sees the same 8 examples; Trainer's distributed sampler gives each its share. Rank 0
saves the gradient Trainer applies (after accumulation and DDP's all-reduce) and the log history
for the test.
"""

import os
import sys

import torch

import wmss
import wmss.data
from trainer_fixtures import GradientCapture, examples, make_pair
from wmss.trainer import WMSSTrainer, training_arguments


def main(out_path: str, per_device_batch: int, accumulation: int) -> None:
    pair = make_pair()
    capture = GradientCapture()
    args = training_arguments(
        os.path.join(os.path.dirname(out_path), "ddp-run"), per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, use_cpu=True,
        ddp_backend="gloo", save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1)
    trainer = WMSSTrainer(pair, args, train_dataset=examples(), processing_class=None,
                          data_collator=wmss.data.Collator(0), callbacks=[capture])
    trainer.train()
    if trainer.args.process_index == 0:
        torch.save({"grads": capture.grads, "log_history": trainer.state.log_history}, out_path)
    # Tear the gloo process group down before the interpreter exits, on every rank. Left alive,
    # its worker threads may still be releasing the last collective's Python tensors when the
    # interpreter finalizes (rank 1 exits while rank 0 still saves): such a thread takes the GIL
    # and is ended by pthread_exit inside a C++ noexcept destructor -> std::terminate
    # ("terminate called without an active exception"), SIGABRT, a failed torchrun. The barrier
    # first: no rank tears its connections down while another still uses them.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
