"""FSDP2 as accelerate prepares it: the lm head in a unit of its own (``FSDPLinear``), the pair as
the root; 2 CPU processes on gloo give the gradients of one process on the whole batch."""

import os
import subprocess
import sys

import pytest
import torch
from trainer_fixtures import examples, make_pair

from wmss.hf.batches import collate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_process_gradients(tie: bool) -> dict:
    pair = make_pair(tie=tie, backend="torch")
    pair(**collate(examples(4), 0)).loss.backward()
    return {name: p.grad for name, p in pair.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_accelerates_fsdp2_preparation_trains_the_pair_as_one_process(tmp_path, tie):
    out = tmp_path / "result.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", os.path.join(ROOT, "tests", "fsdp_worker.py"),
                          str(out), "tied" if tie else "untied"], env=env, cwd=ROOT, timeout=300,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    result = torch.load(out)
    assert result["head_class"] == "FSDPLinear"  # the class wmss used to refuse
    want = one_process_gradients(tie)
    assert result["grads"].keys() == want.keys()
    for name, grad in want.items():
        error = (result["grads"][name] - grad).norm() / grad.norm().clamp(min=1e-30)
        assert error < 1e-5, f"{name}: relative error {error:.1e}"
