"""``wmss train`` launched on two processes (``torchrun``, CPU, gloo): every process runs every
stage, selection scores one share of the data set per process, and only the main process writes
the run's files (one report, one final model, one set of scores merged in data-set order)."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from wmss import commands as cli
from wmss.io import directory_lock
from wmss.recipe import selection
from wmss.recipe.data import load_dataset_file
from wmss.recipe.pipeline import Pipeline, PipelineConfig
from pipeline_fixtures import prompt_records, tiny_workspace
from wmss.recipe.toy import char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "pipeline_worker.py")
EXAMPLE_FSDP2 = os.path.join(ROOT, "examples", "fsdp2.json")
PROCESSES = 2
EXAMPLE_ZERO3 = os.path.join(ROOT, "examples", "zero3.json")
# The shipped ZeRO-3 configuration with every tensor partitioned, however small (DeepSpeed keeps
# tensors below 1e5 elements whole by default: every tensor of these tiny models).
PARTITION_EVERY_TENSOR = {"stage3_param_persistence_threshold": 0}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny base model with its tokenizer, and 15 records (not a multiple of the
    process count, so the shares differ in size)."""
    root = tmp_path_factory.mktemp("launched")
    return (root, *tiny_workspace(root, prompt_records(15)))


@pytest.mark.parametrize("overrides, message", [
    (dict(fsdp_config={}, deepspeed_config={}), "give fsdp_config or deepspeed_config, not both"),
    (dict(deepspeed_config={}, use_cpu=True), "deepspeed_config with use_cpu"),
    (dict(fsdp_config={}, use_cpu=True), "fsdp_config: accelerate runs FSDP on GPUs only"),
    (dict(deepspeed_config="MISSING"), "deepspeed_config: .*missing.json is not a readable JSON"),
    (dict(fsdp_config="LIST"), "fsdp_config: .*list.json holds a JSON list, not an object"),
    (dict(deepspeed_config=3), "deepspeed_config must be a JSON file's path or a dict"),
])
def test_parallelism_settings_that_cannot_work_are_refused_by_name(workspace, overrides,
                                                                   message):
    root, base, data = workspace
    (root / "list.json").write_text("[1]")
    files = {"MISSING": str(root / "missing.json"), "LIST": str(root / "list.json")}
    overrides = {k: files.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    settings = dict(output_dir=str(root / "refused"), data=data, base_model=base)
    with pytest.raises((ValueError, TypeError), match=message):
        PipelineConfig(**{**settings, **overrides})


def test_fsdp_on_one_process_is_refused(workspace, monkeypatch):
    """Where FSDP could run (a GPU machine), a run that was not launched on several processes
    would still train without it: refused."""
    from wmss.recipe import pipeline

    root, base, data = workspace
    monkeypatch.setattr(pipeline, "fsdp_runs_here", lambda use_cpu: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="fsdp_config needs a launched run of several processes"):
        PipelineConfig(output_dir=str(root / "one"), data=data, base_model=base, fsdp_config={})
    monkeypatch.setenv("WORLD_SIZE", "2")
    PipelineConfig(output_dir=str(root / "one"), data=data, base_model=base, fsdp_config={})


def test_a_parallelism_file_counts_by_its_content(workspace):
    """A rerun after the DeepSpeed file was edited (ZeRO stage 2 to 3, say) is another run."""
    root, base, data = workspace
    config = root / "zero.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    settings = PipelineConfig(output_dir=str(root / "content"), data=data, base_model=base,
                              deepspeed_config=str(config))
    before = settings.fingerprint()["deepspeed_config"]
    assert before == {"file": str(config), "content": {"zero_optimization": {"stage": 2}}}
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert settings.fingerprint()["deepspeed_config"] != before


def test_a_run_recorded_before_the_newer_settings_existed_continues(workspace):
    """run.json written by an older wmss lacks the settings added since (parallelism, LoRA):
    they count as their defaults, so the run continues rather than being refused."""
    root, base, data = workspace
    settings = PipelineConfig(output_dir=str(root / "older"), data=data, base_model=base,
                              rounds=0, sft_epochs=0.5, batch_size=2, max_length=64,
                              use_cpu=True)
    Pipeline(settings, verbose=False).run()
    record = root / "older" / "run.json"
    run = json.loads(record.read_text())
    for newer in ("fsdp_config", "deepspeed_config", "lora_rank", "lora_alpha", "lora_dropout",
                  "lora_target_modules"):
        del run["config"][newer]
    record.write_text(json.dumps(run))
    logged = []
    Pipeline(settings, log=logged.append, verbose=False).run()
    assert "[wmss] sft: done earlier, skipped" in logged
    with pytest.raises(ValueError, match=r"other settings \(lora_alpha, lora_rank\)"):
        Pipeline(dataclasses.replace(settings, lora_rank=4), verbose=False).run()


def test_wmss_train_names_a_bad_deepspeed_file(workspace, capsys):
    root, base, data = workspace
    assert cli.main(["train", "--base", base, "--data", data, "--output-dir", str(root / "cli"),
                     "--deepspeed", str(root / "nowhere.json")]) == 1
    assert "deepspeed_config: " in capsys.readouterr().err
    assert not os.path.exists(root / "cli" / "run.json")


def test_a_stage_checkpointed_on_other_processes_is_not_resumed_on_these(workspace,
                                                                          monkeypatch):
    """The global batch (and under FSDP or ZeRO-3 the checkpoints' sharding) depends on the
    process count: an interrupted stage resumes on as many processes as wrote its checkpoints,
    and any other count is refused by name rather than failing inside a checkpoint loader."""
    import transformers

    root, base, data = workspace
    settings = PipelineConfig(output_dir=str(root / "recount"), data=data, base_model=base,
                              rounds=0, batch_size=2, gradient_accumulation_steps=1,
                              max_length=64, save_steps=1, use_cpu=True)
    original, calls = transformers.Trainer.training_step, {"n": 0}

    def crash_in_second_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", crash_in_second_step)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(settings, verbose=False).run()
    monkeypatch.setattr(transformers.Trainer, "training_step", original)
    record = root / "recount" / "sft" / "checkpoints" / "processes.json"
    assert json.loads(record.read_text()) == {"processes": 1}
    record.write_text(json.dumps({"processes": 2}))  # as if written by a 2-process run
    with pytest.raises(ValueError, match=r"checkpoints of a run on 2 processes, not 1"):
        Pipeline(settings, verbose=False).run()
    record.write_text(json.dumps({"processes": 1}))
    report = Pipeline(settings, verbose=False).run()  # the same count resumes
    assert report["stages"][0]["steps"] > 1


def launch(output_dir, base, data, *extra, timeout=600, program=("-m", "wmss", "train")):
    """``torchrun --nproc_per_node=2 -m wmss train ...`` as a user types it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={PROCESSES}", *program, "--base", base,
               "--data", data, "--output-dir", str(output_dir), "--rounds", "1", "--lr", "1e-3",
               "--batch-size", "2", "--grad-accum", "2", "--max-length", "64", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, cwd=ROOT, timeout=timeout, capture_output=True,
                          text=True)


def assert_scores_are_the_whole_data_set_in_order(out, base, data):
    """The merged scores equal one process scoring every record with the same two models."""
    stage = out / "round-1" / "selection"
    merged = selection.DatasetScores.load(stage / selection.SCORES_FILE)
    dataset = load_dataset_file(data, char_tokenizer(), 64)
    strong = AutoModelForCausalLM.from_pretrained(out / "sft" / "model")
    weak = AutoModelForCausalLM.from_pretrained(base)
    alone = selection.score_dataset(strong, weak, dataset, progress=False, backend="torch")
    assert len(merged) == len(dataset)
    for name in ("entropy_strong", "entropy_weak", "tokens"):
        torch.testing.assert_close(getattr(merged, name), getattr(alone, name), rtol=1e-6,
                                   atol=1e-9)
    assert merged.metadata == alone.metadata  # the whole data set's and models' signatures
    assert not [f for f in os.listdir(stage) if ".process-" in f]  # the shares were merged


def assert_trained_with(out, kind):
    """Both training stages ran as ``kind`` (accelerate's distributed type) on 2 processes."""
    for stage in ("sft", "round-1/train"):
        report = json.loads((out / stage / "report.json").read_text())
        assert report["parallelism"] == {"type": kind, "processes": PROCESSES}, stage


def assert_a_sharded_run_saved_whole_models(run, out, base, data, kind):
    """A launched run that trained as ``kind`` (sharded models) and still saved every model whole
    and merged every process's selection scores."""
    assert run.returncode == 0, run.stderr[-4000:]
    assert_trained_with(out, kind)
    for stage in ("sft", "round-1"):
        assert_a_complete_model(out / stage / "model", base)
    assert_scores_are_the_whole_data_set_in_order(out, base, data)


def assert_a_complete_model(folder, like):
    """A model folder with every tensor at its full shape (not a shard, not ZeRO-3's 0 elements)
    and trained weights (not those of ``like``, the model the run started from)."""
    saved = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(like).state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}
    assert any(not torch.equal(saved[k], expected[k]) for k in saved)
    assert os.path.exists(os.path.join(folder, "tokenizer_config.json"))


@pytest.mark.slow
def test_wmss_train_on_two_processes_writes_one_run(workspace):
    root, base, data = workspace
    out = root / "ddp"
    run = launch(out, base, data, "--cpu")
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count('"final_model"') == 1         # the main process reports
    assert run.stdout.count("[wmss] sft: running") == 1  # and logs, once
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["sft", "round-1/selection",
                                                      "round-1/train"]
    for stage in ("sft", "round-1"):
        assert_a_complete_model(out / stage / "model", base)
        assert not os.path.exists(out / stage / "model.partial")
    assert_scores_are_the_whole_data_set_in_order(out, base, data)
    assert_trained_with(out, "MULTI_CPU")
    trained = report["stages"][2]
    assert trained["steps"] >= 1 and torch.isfinite(torch.tensor(trained["train_loss"]))


@pytest.mark.slow
def test_wmss_train_lora_on_two_processes_trains_adapters_with_ddp(workspace):
    root, base, data = workspace
    out = root / "lora-ddp"
    run = launch(out, base, data, "--cpu", "--lora", "--lora-rank", "4")
    assert run.returncode == 0, run.stderr[-4000:]
    assert_trained_with(out, "MULTI_CPU")
    for stage in ("sft", "round-1"):
        assert (out / stage / "model" / "adapter_config.json").exists()
        assert not (out / stage / "model" / "model.safetensors").exists()
        ids = torch.tensor([[3, 5, 7, 9]])
        with torch.no_grad():  # the adapter loads onto the base, and is trained
            adapted = AutoModelForCausalLM.from_pretrained(out / stage / "model")(ids).logits
            plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        assert (adapted - plain).abs().max() > 1e-4, stage
    assert_scores_are_the_whole_data_set_in_order(out, base, data)


@pytest.mark.slow
def test_an_error_on_the_main_process_stops_every_process(workspace, tmp_path):
    """The output directory is held by another run: the main process cannot take the lock, and
    the other process, which would wait for it at the first stage, gets the same error at once,
    also where no launcher stops the processes when one fails (the worker catches the error)."""
    root, base, data = workspace
    out = root / "busy"
    with directory_lock(str(out), "another run"):
        start = time.monotonic()
        run = launch(out, base, data, "--cpu", timeout=300)  # the command: one message
        assert run.returncode != 0
        assert run.stderr.count("wmss train: error:") == 1, run.stderr[-4000:]
        assert "another run" in run.stderr
        worker = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc_per_node={PROCESSES}", WORKER, "catch", str(tmp_path), str(out), base,
             data],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300,
            capture_output=True, text=True)
    assert worker.returncode == 0, worker.stderr[-4000:]
    for rank in range(PROCESSES):
        seen = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert seen["error"] in ("DirectoryInUseError", "OSError"), seen
        assert "another run" in seen["message"]
    assert time.monotonic() - start < 240  # no process left waiting for the collective timeout
    assert not os.path.exists(out / "run.json")


@pytest.mark.slow
def test_an_error_on_one_other_process_stops_every_process(workspace, tmp_path):
    """Each process scores its own share, so an error may be one process's alone: every
    process raises it (the main one, which reports, naming the process), none waits."""
    root, base, data = workspace
    worker = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={PROCESSES}", WORKER, "catch", str(tmp_path), str(root / "one-fails"),
         base, data, "scoring-fails-on-process-1"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300,
        capture_output=True, text=True)
    assert worker.returncode == 0, worker.stderr[-4000:]
    seen = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(PROCESSES)]
    assert [s["error"] for s in seen] == ["ValueError", "ValueError"], seen
    assert seen[0]["message"].startswith("process 1: simulated scoring failure")
    assert seen[1]["message"].startswith("simulated scoring failure")


@pytest.mark.slow
def test_wmss_train_under_deepspeed_zero3_saves_whole_models(workspace):
    """``wmss train --deepspeed`` with a ZeRO-3 configuration: the models load partitioned
    (``zero.Init``), yet every saved model is whole and selection runs on whole models.
    On CPUs through ``pipeline_worker.py deepspeed-on-cpu`` (accelerate prepares DeepSpeed on
    GPU machines only; the worker's docstring says what it changes)."""
    pytest.importorskip("deepspeed")
    root, base, data = workspace
    zero3 = json.loads(open(EXAMPLE_ZERO3).read())
    zero3["zero_optimization"].update(PARTITION_EVERY_TENSOR)
    config = root / "zero3.json"
    config.write_text(json.dumps(zero3))
    out = root / "zero3"
    run = launch(out, base, data, "--deepspeed", str(config),
                 program=(WORKER, "deepspeed-on-cpu"))
    assert_a_sharded_run_saved_whole_models(run, out, base, data, "DEEPSPEED")


@pytest.mark.slow
@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="transformers 4's Trainer asks for a GPU-like device when it sets up FSDP")
def test_wmss_train_under_fsdp2_saves_whole_models(workspace):
    """``wmss train --fsdp`` with FSDP2 wrapping each decoder layer and sharded checkpoints:
    every saved model is whole. On CPUs through ``pipeline_worker.py fsdp-on-cpu`` (accelerate
    runs FSDP on GPUs only; the worker's docstring says what it changes)."""
    root, base, data = workspace
    out = root / "fsdp2"
    run = launch(out, base, data, "--cpu", "--fsdp", EXAMPLE_FSDP2,
                 program=(WORKER, "fsdp-on-cpu"))
    assert_a_sharded_run_saved_whole_models(run, out, base, data, "FSDP")
