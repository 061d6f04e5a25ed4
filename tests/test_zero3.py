"""WMSS pairs under DeepSpeed ZeRO-3 (CPU, gloo): ``apply_wmss`` on models built or loaded under
``deepspeed.zero.Init`` checks their real shapes, and 2 processes under ``deepspeed.initialize``
give the loss and gradients of one process on the whole batch. The DeepSpeed runs are in
subprocesses (tests/zero3_worker.py): they need a process group, and DeepSpeed's globals must not
leak into the other tests."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from trainer_fixtures import VOCAB, examples

import wmss
from wmss.hf.batches import collate
from wmss.hf.models import load_causal_lm
from wmss.recipe.toy import tiny_causal_lm

pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "zero3_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# (case the worker ran, checkpoint prefix, train_weak), as tests/zero3_worker.py's CASES
CASES = [("tied", "tied", True), ("untied", "untied", True), ("tied-frozen-weak", "tied", False),
         ("untied-partitioned-by-initialize", "untied", True)]


def run(args, **env) -> None:
    done = subprocess.run(args, env={**ENV, **env}, cwd=ROOT, timeout=300, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-4000:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """What ``apply_wmss`` said of zero.Init models, in one process of a 1-process group."""
    out = tmp_path_factory.mktemp("zero3-checks") / "checks.pt"
    run([sys.executable, WORKER, "checks", str(out)], MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return torch.load(out)


@pytest.mark.slow
def test_apply_wmss_checks_zero_init_models_by_their_full_shapes(checks):
    assert checks["partitioned"] == (0,)  # the worker's models are partitioned indeed
    assert checks["tied"] == "ok" and checks["untied"] == "ok"
    assert checks["external"] == [(VOCAB, 32), (VOCAB, 32)]


@pytest.mark.slow
def test_a_vocabulary_mismatch_under_zero_init_is_still_refused(checks):
    assert checks["vocabulary"] == (
        "ValueError: vocabulary mismatch: the strong model's head has 61 rows and the weak "
        "model's 67; WMSS mixes logits token by token, so both models need the same vocabulary "
        "(resize_token_embeddings one of them)")


@pytest.mark.slow
def test_the_head_verification_runs_on_zero_init_models(checks):
    assert checks["transform"].startswith("ValueError: weak model: Qwen3ForCausalLM's logits are "
                                          "not softcap(scale * lm_head(h))")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    directory = tmp_path_factory.mktemp("zero3-models")
    for tie in ("tied", "untied"):
        for name, seed in (("strong", 1), ("weak", 2)):
            tiny_causal_lm("qwen3", vocab_size=VOCAB, hidden_size=32, seed=seed,
                           tie_word_embeddings=tie == "tied").save_pretrained(
                directory / f"{tie}-{name}")
    torch.save(collate(examples(4), 0), directory / "batch.pt")
    return directory


def one_process(checkpoints, prefix: str, train_weak: bool):
    """Loss and gradients of the pair on the whole batch, one process, no DeepSpeed."""
    strong, weak = (load_causal_lm(str(checkpoints / f"{prefix}-{name}"))
                    for name in ("strong", "weak"))
    pair = wmss.apply_wmss(strong, weak, lam=0.4, train_weak=train_weak, backend="torch")
    out = pair(**torch.load(checkpoints / "batch.pt"))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in pair.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_zero3_on_two_processes_trains_the_pair_as_one_process(tmp_path, checkpoints):
    out = tmp_path / "result.pt"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         WORKER, "train", str(out), str(checkpoints)])
    results = torch.load(out)
    assert list(results) == [name for name, *_ in CASES]
    for name, prefix, train_weak in CASES:
        result = results[name]
        assert result["head"] == (0,), name  # partitioned again after the backward
        # Gathered for the loss alone, not while the backbones run (as it would be if the pair
        # read it in its own forward: DeepSpeed would then gather it for the pair's).
        assert result["head during backbones"] == ["NOT_AVAILABLE"] * 2, name
        loss, grads = one_process(checkpoints, prefix, train_weak)
        assert torch.allclose(result["loss"], loss, rtol=1e-5, atol=0), name
        assert result["grads"].keys() == grads.keys(), name
        assert any(key.startswith("weak.") for key in grads) == train_weak
        for key, grad in grads.items():
            error = (result["grads"][key] - grad).norm() / grad.norm().clamp(min=1e-30)
            assert error < 1e-5, f"{name}: {key}: relative error {error:.1e}"
