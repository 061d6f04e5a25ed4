"""WMSSTrainer: gradient accumulation, logging, two-model checkpoints, DDP, TRL."""

import os
import subprocess
import sys

import pytest
import torch

import wmss
from trainer_fixtures import GradientCapture, examples, make_pair, snapshot
from wmss.data import Collator, collate
from wmss.trainer import WMSSTrainer, training_arguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sgd_args(output_dir, **overrides):
    """One plain SGD step, no clipping."""
    settings = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=1,
                    learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                    max_grad_norm=0.0, weight_decay=0.0, use_cpu=True, save_strategy="no",
                    disable_tqdm=True, seed=0)
    settings.update(overrides)
    return training_arguments(str(output_dir), **settings)


def full_batch_gradient():
    """The gradient of the mixed loss averaged over every supervised (shifted) token of the data."""
    pair = make_pair()
    batch = collate(examples(), pad_token_id=0)
    pair(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in pair.named_parameters()}


def assert_same_gradients(got, want, tol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        error = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-30)
        assert error < tol, f"{name}: relative error {error:.2e}"


def test_gradient_accumulation_gives_the_full_batch_token_mean(tmp_path):
    """4 micro-batches of 2 with uneven supervision: one update equal to the full-batch gradient,
    which needs num_items_in_batch counted on the shifted labels of all micro-batches."""
    capture = GradientCapture()
    trainer = WMSSTrainer(make_pair(), sgd_args(tmp_path, per_device_train_batch_size=2,
                                                gradient_accumulation_steps=4),
                          train_dataset=examples(), data_collator=Collator(0), callbacks=[capture])
    trainer.train()
    assert_same_gradients(capture.grads, full_batch_gradient())


def test_logs_the_strong_and_weak_losses_and_entropies(tmp_path):
    pair = make_pair()
    trainer = WMSSTrainer(pair, sgd_args(tmp_path, max_steps=2, learning_rate=1e-3,
                                         per_device_train_batch_size=4, logging_steps=1),
                          train_dataset=examples(), data_collator=Collator(0))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        for key in ("strong_loss", "weak_loss", "entropy_strong", "entropy_weak",
                    "mixed_fraction"):
            assert key in entry and entry[key] == entry[key]  # present and not NaN
        assert 0 < entry["entropy_strong"] < torch.log(torch.tensor(61.0)).item() + 1e-3


def test_checkpoints_hold_both_models_and_resume_exactly(tmp_path):
    """Tied embeddings (Qwen3 with tie_word_embeddings) in both models; a run interrupted after
    step 2 and resumed ends where the uninterrupted run ends."""
    def trainer_for(pair, output_dir, **overrides):
        args = sgd_args(output_dir, max_steps=4, learning_rate=0.05, per_device_train_batch_size=2,
                        save_strategy="steps", save_steps=2, optim="adamw_torch", **overrides)
        return WMSSTrainer(pair, args, train_dataset=examples(), data_collator=Collator(0))

    straight = make_pair()
    trainer_for(straight, tmp_path / "straight").train()

    resumed = make_pair()
    trainer = trainer_for(resumed, tmp_path / "resumed")
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    trainer.train()
    assert sorted(os.listdir(checkpoint / "strong")) == sorted(os.listdir(checkpoint / "weak"))
    assert (checkpoint / "strong" / "model.safetensors").exists()
    fresh = make_pair()
    trainer_for(fresh, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    for (name, want), got in zip(snapshot(straight).items(), snapshot(fresh).values()):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), name
    assert fresh.strong.lm_head.weight is fresh.strong.get_input_embeddings().weight


def test_bad_uses_are_refused(tmp_path):
    with pytest.raises(TypeError, match="WMSSPair"):
        WMSSTrainer(make_pair().strong, sgd_args(tmp_path), train_dataset=examples())
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        WMSSTrainer(make_pair(), sgd_args(tmp_path, label_smoothing_factor=0.1),
                    train_dataset=examples(), data_collator=Collator(0))


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    """torchrun, gloo: 2 processes x 2 examples x 2 accumulation steps = the whole data set.
    Trainer sums num_items_in_batch over processes and rescales the loss, so DDP's gradient mean
    is the global token mean."""
    out = tmp_path / "delta.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free local port (a fixed one can be taken on a busy machine).
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", os.path.join(ROOT, "tests", "ddp_worker.py"),
                          str(out), "2", "2"], env=env, cwd=ROOT, timeout=300,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert_same_gradients(torch.load(out), full_batch_gradient())


def test_trl_sft_trainer_trains_the_pair_with_the_wmss_loss(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from wmss.toy import char_tokenizer
    from wmss.trainer import WMSSSFTTrainer

    tokenizer = char_tokenizer()
    records = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=2,
                           learning_rate=1e-2, report_to="none", use_cpu=True, logging_steps=1,
                           save_strategy="no", disable_tqdm=True)

    def pair():
        strong = wmss.toy.tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, seed=1)
        weak = wmss.toy.tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, seed=2)
        return wmss.apply_wmss(strong, weak)

    trained = pair()
    weak_before = snapshot(trained.weak)
    trainer = WMSSSFTTrainer(model=trained, args=config,
                             train_dataset=datasets.Dataset.from_list(records),
                             processing_class=tokenizer)
    trainer.train()
    assert any(not torch.equal(weak_before[k], p) for k, p in snapshot(trained.weak).items()), \
        "the weak model did not train: the WMSS loss was bypassed"
    assert "weak_loss" in trainer.state.log_history[0]

    plain = trl.SFTTrainer(model=pair(), args=config,
                           train_dataset=datasets.Dataset.from_list(records),
                           processing_class=tokenizer)
    with pytest.raises(AttributeError, match="bypass the WMSS loss"):
        plain.train()


def test_activation_checkpointing_through_training_arguments(tmp_path):
    capture = GradientCapture()
    pair = make_pair()
    trainer = WMSSTrainer(pair, sgd_args(tmp_path, activation_checkpointing=True),
                          train_dataset=examples(), data_collator=Collator(0), callbacks=[capture])
    trainer.train()
    for model in (pair.strong, pair.weak):
        flag = getattr(model, "is_activation_checkpointing", None)
        assert flag if flag is not None else model.is_gradient_checkpointing
    assert_same_gradients(capture.grads, full_batch_gradient())
