"""One pair step under accelerate's FSDP2 preparation, run by tests/test_fsdp.py under
``torchrun`` (2 CPU processes, gloo).

accelerate turns FSDP off on CPU (``Accelerator(cpu=True)`` prepares DDP), so this drives the
function its FSDP2 path calls, ``accelerate.utils.fsdp_utils.fsdp2_prepare_model``, directly with
an FSDP2 plugin: auto-wrap on the decoder layer class, the embeddings, and the final norm with the
lm head carved into units of their own, the pair as the root. Each process runs half of the batch;
rank 0 saves the full gradients (``DTensor.full_tensor``) for the test.
"""

import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from trainer_fixtures import examples, make_pair

from wmss.hf.batches import collate


def main(out_path: str, tie: bool) -> None:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Qwen3DecoderLayer"])
    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = plugin
    pair = make_pair(tie=tie, backend="torch")
    model = fsdp2_prepare_model(accelerator, pair)
    batch = collate(examples(4), 0)
    rank, world = dist.get_rank(), dist.get_world_size()
    share = {k: v.chunk(world)[rank] for k, v in batch.items()}
    count = (batch["labels"][:, 1:] != -100).sum()  # the whole batch's supervised tokens
    out = model(**share, num_items_in_batch=count)
    (out.loss * world).backward()  # FSDP averages the gradients over processes
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
             for name, p in pair.named_parameters() if p.grad is not None}
    head = type(pair.strong.get_output_embeddings()).__name__
    if rank == 0:
        torch.save({"grads": grads, "head_class": head}, out_path)
    # As tests/ddp_worker.py: past the last collective, exit without interpreter finalization.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "tied")
