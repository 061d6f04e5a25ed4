"""WMSSTrainer: gradient accumulation, logging, two-model checkpoints, DDP, TRL."""

import errno
import glob
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

import wmss
from trainer_fixtures import (
    GradientCapture,
    LabelCollator,
    examples,
    make_pair,
    own_statistics,
    snapshot,
)
from wmss.hf.batches import Collator, collate
from wmss.recipe.toy import tiny_causal_lm
from wmss.hf.trainer import (
    MARKER_FILE,
    CompleteCheckpointMarker,
    WMSSTrainer,
    last_complete_checkpoint,
    load_model_weights,
    training_arguments,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sgd_args(output_dir, **overrides):
    """One plain SGD step, no clipping."""
    settings = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=1,
                    learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                    max_grad_norm=0.0, weight_decay=0.0, use_cpu=True, save_strategy="no",
                    disable_tqdm=True, seed=0)
    settings.update(overrides)
    return training_arguments(str(output_dir), **settings)


def full_batch_gradient(ignore_index=-100):
    """The gradient of the mixed loss averaged over every supervised (shifted) token of the data."""
    pair = make_pair(ignore_index=ignore_index)
    batch = LabelCollator(ignore_index)(examples(ignore_index=ignore_index))
    pair(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in pair.named_parameters()}


def assert_same_gradients(got, want, tol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        error = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-30)
        assert error < tol, f"{name}: relative error {error:.2e}"


def assert_same_weights(got: dict, want: dict, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """Two state dicts (or parameter snapshots) name for name: the same names, and each tensor
    close to the one of its own name (rtol = atol = 0: equal), whatever the order of either."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name, expected in want.items():
        assert torch.allclose(got[name], expected, rtol=rtol, atol=atol), name


def test_gradient_accumulation_gives_the_full_batch_token_mean(tmp_path):
    """4 micro-batches of 2 with uneven supervision: one update equal to the full-batch gradient,
    which needs num_items_in_batch counted on the shifted labels of all micro-batches."""
    capture = GradientCapture()
    trainer = WMSSTrainer(make_pair(), sgd_args(tmp_path, per_device_train_batch_size=2,
                                                gradient_accumulation_steps=4),
                          train_dataset=examples(), data_collator=Collator(0), callbacks=[capture])
    trainer.train()
    assert_same_gradients(capture.grads, full_batch_gradient())


def test_num_items_in_batch_is_counted_with_the_pairs_ignore_index_on_shifted_labels(tmp_path):
    """A pair whose ignore_index is -1 (not transformers' -100) and examples whose first label is
    supervised (a target of nothing: it is shifted away): the applied gradient is still the
    full-batch token mean, whatever the installed transformers counts."""
    capture = GradientCapture()
    trainer = WMSSTrainer(make_pair(ignore_index=-1),
                          sgd_args(tmp_path, per_device_train_batch_size=2,
                                   gradient_accumulation_steps=4),
                          train_dataset=examples(ignore_index=-1), data_collator=LabelCollator(-1),
                          callbacks=[capture])
    trainer.train()
    assert_same_gradients(capture.grads, full_batch_gradient(ignore_index=-1))


def test_the_evaluation_loss_is_the_token_mean_with_the_pairs_ignore_index(tmp_path):
    """Evaluation gives eval_loss (the pair's optional shift_labels is not a required label),
    counted with the pair's ignore_index (-1 here)."""
    evaluated = make_pair(ignore_index=-1)
    trainer = WMSSTrainer(evaluated, sgd_args(tmp_path, per_device_eval_batch_size=8),
                          data_collator=LabelCollator(-1))
    eval_loss = trainer.evaluate(eval_dataset=examples(ignore_index=-1))["eval_loss"]
    with torch.no_grad():
        want = evaluated(**LabelCollator(-1)(examples(ignore_index=-1))).loss.item()
    assert eval_loss == pytest.approx(want, rel=1e-5)


LOGGED = ("strong_loss", "weak_loss", "entropy_strong", "entropy_weak", "mixed_fraction")
LOG_TOLERANCE = 2e-5  # the logs are rounded to 6 decimals; float32 forward


def test_logged_metrics_are_token_means_of_the_models_own_values_over_each_window(tmp_path):
    """Two logging windows of 4 one-example micro-batches (all of different token counts), with
    gap masking: each logged value is that window's mean over its supervised tokens of what the
    models themselves give (their HF loss, their logits' entropies), not the mean of the
    micro-batches' means, nor the last micro-batch's, nor the other model's."""
    pair = make_pair(gap_threshold=0.0)
    with torch.no_grad():  # peaked distributions: entropies that differ between examples
        for model in (pair.strong, pair.weak):
            model.lm_head.weight.mul_(8)
    collator = LabelCollator()
    trainer = WMSSTrainer(pair, sgd_args(tmp_path, max_steps=2, learning_rate=0.0,
                                         per_device_train_batch_size=1,
                                         gradient_accumulation_steps=4, logging_steps=1),
                          train_dataset=examples(), data_collator=collator)
    trainer.train()  # learning rate 0: the models stay as they are, to compute the expectation
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and len(collator.batches) == 8
    distinct = set()
    for window, entry in enumerate(logged):
        micro_batches = collator.batches[4 * window:4 * window + 4]
        want = own_statistics(pair, sum(micro_batches, []))
        per_micro_batch = [own_statistics(pair, batch) for batch in micro_batches]
        for key in LOGGED:
            assert entry[key] == pytest.approx(want[key], abs=LOG_TOLERANCE), (window, key)
            mean_of_means = sum(stats[key] for stats in per_micro_batch) / 4
            if abs(mean_of_means - want[key]) > 10 * LOG_TOLERANCE:
                distinct.add(key)
    assert distinct == set(LOGGED), "the data does not tell the two averages apart"


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
    assert_same_weights(snapshot(fresh), snapshot(straight))
    assert fresh.strong.lm_head.weight is fresh.strong.get_input_embeddings().weight


def test_bad_uses_are_refused(tmp_path):
    with pytest.raises(TypeError, match="WMSSPair"):
        WMSSTrainer(make_pair().strong, sgd_args(tmp_path), train_dataset=examples())
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        WMSSTrainer(make_pair(), sgd_args(tmp_path, label_smoothing_factor=0.1),
                    train_dataset=examples(), data_collator=Collator(0))


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    """torchrun, gloo: 2 processes x 2 examples x 2 accumulation steps = the whole data set.
    Trainer sums num_items_in_batch over processes and rescales the loss, so DDP's gradient mean
    is the global token mean."""
    out = tmp_path / "result.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free local port (a fixed one can be taken on a busy machine).
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", os.path.join(ROOT, "tests", "ddp_worker.py"),
                          str(out), "2", "2"], env=env, cwd=ROOT, timeout=300,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "terminate called" not in run.stderr and "Aborted" not in run.stderr, run.stderr[-4000:]
    result = torch.load(out)
    assert_same_gradients(result["grads"], full_batch_gradient())
    # The logged statistics are the token means over both processes' micro-batches.
    (entry,) = [entry for entry in result["log_history"] if "loss" in entry]
    want = own_statistics(make_pair(), examples())
    for key in LOGGED:
        assert entry[key] == pytest.approx(want[key], abs=LOG_TOLERANCE), key


def test_token_averaging_is_asked_for_only_where_there_are_processes_to_average_over(tmp_path):
    """training_arguments turns average_tokens_across_devices on for several processes (the DDP
    test above depends on it: transformers before 4.54 defaults to False); on one process
    transformers before 4.54 would warn that it is invalid there, so it is not asked for."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.training_args")
    logger.addHandler(handler)
    try:
        sgd_args(tmp_path)
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "average_tokens" in r.getMessage()]


def test_trl_sft_trainer_trains_the_pair_with_the_wmss_loss(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from wmss.recipe.toy import char_tokenizer
    from wmss.hf.trainer import WMSSSFTTrainer

    tokenizer = char_tokenizer()
    records = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=2,
                           learning_rate=1e-2, report_to="none", use_cpu=True, logging_steps=1,
                           save_strategy="no", disable_tqdm=True, bf16=False)

    def pair():
        strong = wmss.recipe.toy.tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, seed=1)
        weak = wmss.recipe.toy.tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, seed=2)
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
    # Recent TRL replaces the pair's forward with its own LM head (the pair has no base_model);
    # TRL 0.x runs the pair's forward, then reads outputs.logits. Either way: WMSSSFTTrainer.
    with pytest.raises(AttributeError, match="train the pair with wmss.WMSSSFTTrainer"):
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


# ---- resume: weights, and checkpoints that survive a kill or a full disk ----------------------


def test_a_tied_lm_head_loads_from_a_checkpoint_that_stores_only_the_embeddings(tmp_path):
    saved = tiny_causal_lm("qwen3", vocab_size=61, hidden_size=32, seed=1, tie_word_embeddings=True)
    saved.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    model = tiny_causal_lm("qwen3", vocab_size=61, hidden_size=32, seed=2, tie_word_embeddings=True)
    load_model_weights(model, str(tmp_path))
    assert_same_weights(model.state_dict(), saved.state_dict(), rtol=0.0, atol=0.0)
    assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("tie", [False, True])
def test_a_checkpoint_missing_a_tensor_no_loaded_one_is_tied_to_is_refused(tmp_path, tie):
    """Untied lm head absent from the file; or (tied model) the final norm absent: ValueError
    naming it, and the model is left as it was."""
    saved = tiny_causal_lm("qwen3", vocab_size=61, hidden_size=32, seed=1, tie_word_embeddings=tie)
    saved.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    state = load_file(path)
    dropped = "model.norm.weight" if tie else "lm_head.weight"
    del state[dropped]
    save_file(state, path, metadata={"format": "pt"})
    model = tiny_causal_lm("qwen3", vocab_size=61, hidden_size=32, seed=2, tie_word_embeddings=tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"missing \['{dropped}'\]"):
        load_model_weights(model, str(tmp_path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def checkpointing_args(output_dir):
    """4 AdamW steps of 2 examples, a checkpoint every 2 steps."""
    return sgd_args(output_dir, max_steps=4, learning_rate=0.05, per_device_train_batch_size=2,
                    save_strategy="steps", save_steps=2, optim="adamw_torch")


class SimulatedKill(BaseException):
    """What a SIGKILL looks like to the code it interrupts: nothing after it runs."""


def fail_in_the_save_of_step(monkeypatch, step, how):
    """Make the save of checkpoint-{step} stop after the models, the optimizer (half of it, for
    a full disk) and the scheduler are written, before the RNG and trainer states."""
    real_save, real_rng = torch.save, Trainer._save_rng_state

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else ""
        if how == "full disk" and name.endswith(f"checkpoint-{step}{os.sep}optimizer.pt"):
            os.truncate(name, os.path.getsize(name) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

    def save_rng_state(self, output_dir):
        if how == "kill" and self.state.global_step == step:
            raise SimulatedKill
        return real_rng(self, output_dir)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)
    return SimulatedKill if how == "kill" else OSError


@pytest.mark.parametrize("how", ["kill", "full disk"])
def test_a_rerun_after_a_save_interrupted_halfway_resumes_from_the_last_complete_checkpoint(
        tmp_path, monkeypatch, how):
    straight = make_pair()
    WMSSTrainer(straight, checkpointing_args(tmp_path / "straight"), train_dataset=examples(),
                data_collator=Collator(0)).train()

    output_dir = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        error = fail_in_the_save_of_step(patch, 4, how)
        with pytest.raises(error):
            WMSSTrainer(make_pair(), checkpointing_args(output_dir), train_dataset=examples(),
                        data_collator=Collator(0)).train()
    half_written = output_dir / "checkpoint-4"
    assert (half_written / "strong" / "model.safetensors").exists()
    assert get_last_checkpoint(str(output_dir)) == str(half_written)  # what Trainer would pick
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-2")

    rerun = make_pair()
    with pytest.warns(UserWarning, match="set aside"):
        WMSSTrainer(rerun, checkpointing_args(output_dir), train_dataset=examples(),
                    data_collator=Collator(0)).train(resume_from_checkpoint=True)
    assert_same_weights(snapshot(rerun), snapshot(straight))
    assert last_complete_checkpoint(output_dir) == str(half_written)  # saved anew, complete
    (set_aside,) = glob.glob(str(output_dir / "incomplete-checkpoint-4-*"))
    assert not os.path.exists(os.path.join(set_aside, "trainer_state.json"))


def test_the_marker_works_with_a_plain_trainer_and_is_withdrawn_before_a_checkpoint_is_rewritten(
        tmp_path, monkeypatch):
    """A plain transformers.Trainer (the pipeline's SFT stage) with the callback: a second, fresh
    run in the same folder killed while rewriting checkpoint-4 leaves it unmarked (not marked by
    the first run), and resuming from last_complete_checkpoint ends where a straight run ends."""
    def trainer(model):
        return Trainer(model=model, args=checkpointing_args(tmp_path), train_dataset=examples(),
                       data_collator=Collator(0), callbacks=[CompleteCheckpointMarker()])

    def model():
        return tiny_causal_lm("qwen3", vocab_size=61, hidden_size=32, seed=1,
                              tie_word_embeddings=True)

    straight = model()
    trainer(straight).train()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    with monkeypatch.context() as patch:
        error = fail_in_the_save_of_step(patch, 4, "kill")
        with pytest.raises(error):
            trainer(model()).train()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    resumed = model()
    trainer(resumed).train(resume_from_checkpoint=last_complete_checkpoint(tmp_path))
    assert_same_weights(resumed.state_dict(), straight.state_dict())
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")


def test_a_marked_checkpoint_whose_files_changed_since_is_not_complete(tmp_path):
    assert last_complete_checkpoint(tmp_path / "absent") is None
    WMSSTrainer(make_pair(), checkpointing_args(tmp_path), train_dataset=examples(),
                data_collator=Collator(0)).train()
    newest = tmp_path / "checkpoint-4"
    assert (newest / MARKER_FILE).exists()
    weights = newest / "weak" / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) - 1)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="not a directory"):
        last_complete_checkpoint(weights)


def test_resume_true_without_a_complete_checkpoint_is_refused_before_training(tmp_path):
    trainer = WMSSTrainer(make_pair(), checkpointing_args(tmp_path), train_dataset=examples(),
                          data_collator=Collator(0))
    os.makedirs(tmp_path / "checkpoint-2" / "strong")  # a save killed at once
    with pytest.raises(ValueError, match=r"no complete checkpoint .*checkpoint-2"):
        trainer.train(resume_from_checkpoint=True)
    assert os.path.isdir(tmp_path / "checkpoint-2")  # nothing moved
    with pytest.raises(ValueError, match="trainer_state.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
