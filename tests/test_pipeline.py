"""wmss.pipeline and the ``wmss train`` / ``wmss demo`` commands, end to end on tiny models."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from wmss import commands as cli
from wmss.recipe.demo import DemoSettings, run_demo
from wmss.recipe.pipeline import Pipeline, PipelineConfig
from wmss.recipe.toy import char_tokenizer
from wmss.hf.trainer import MARKER_FILE, WMSSTrainer
from pipeline_fixtures import chat_records, prompt_records, tiny_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny base model with its tokenizer, and a small JSONL of both record kinds."""
    root = tmp_path_factory.mktemp("pipeline")
    records = [r for pair in zip(prompt_records(12), chat_records(12)) for r in pair]
    return (root, *tiny_workspace(root, records))


def config(root, base, data, name, **overrides):
    settings = dict(output_dir=str(root / name), data=data, base_model=base, rounds=2,
                    learning_rate=1e-3, batch_size=4, gradient_accumulation_steps=2,
                    max_length=64, save_steps=2, logging_steps=1, use_cpu=True)
    settings.update(overrides)
    return PipelineConfig(**settings)


def weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_wmss_train_runs_every_stage_and_reports(workspace, capsys):
    root, base, data = workspace
    out = root / "cli-run"
    assert cli.main(["train", "--base", base, "--data", data, "--output-dir", str(out),
                     "--rounds", "2", "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "2",
                     "--max-length", "64", "--cpu"]) == 0
    assert '"final_model"' in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    names = [stage["stage"] for stage in report["stages"]]
    assert names == ["sft", "round-1/selection", "round-1/train", "round-2/selection",
                     "round-2/train"]
    assert report["final_model"] == str(out / "round-2" / "model")
    for stage in report["stages"]:
        assert (out / stage["stage"] / "report.json").exists() and stage["seconds"] >= 0
    active = json.loads((out / "round-1" / "selection" / "active_indices.json").read_text())
    assert active == sorted(set(active)) and 0 < len(active) <= 24
    round_2 = json.loads((out / "round-2" / "train" / "report.json").read_text())
    assert round_2["weak"] == str(out / "sft" / "model")          # round t: weak = M_{t-1}
    assert round_2["strong"] == str(out / "round-1" / "model")    #          strong = M_t
    assert not (out / "round-1" / "train" / "checkpoints").exists()
    final = AutoModelForCausalLM.from_pretrained(report["final_model"])
    assert final.config.vocab_size == len(char_tokenizer())


@pytest.mark.slow
def test_a_rerun_continues_where_an_interrupted_run_stopped(workspace, monkeypatch):
    root, base, data = workspace
    # A checkpoint after every optimizer step; the run dies inside round 1's second step.
    straight = Pipeline(config(root, base, data, "straight", save_steps=1), verbose=False).run()

    calls = {"n": 0}
    original = WMSSTrainer.training_step

    def crash_in_second_step(self, *args, **kwargs):  # 2 micro-batches per optimizer step
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WMSSTrainer, "training_step", crash_in_second_step)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(config(root, base, data, "interrupted", save_steps=1), verbose=False).run()
    checkpoints = root / "interrupted" / "round-1" / "train" / "checkpoints"
    assert [n for n in os.listdir(checkpoints) if n.startswith("checkpoint")] == ["checkpoint-1"]
    assert (root / "interrupted" / "sft" / "report.json").exists()
    monkeypatch.setattr(WMSSTrainer, "training_step", original)
    # And a later save was killed halfway (or ran out of disk): checkpoint-2 is half written.
    half = checkpoints / "checkpoint-2"
    shutil.copytree(checkpoints / "checkpoint-1", half)
    (half / MARKER_FILE).unlink()
    weights_file = half / "strong" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])

    logged = []
    resumed = Pipeline(config(root, base, data, "interrupted", save_steps=1), log=logged.append,
                       verbose=False).run()
    assert "[wmss] sft: done earlier, skipped" in logged
    assert "[wmss] round-1/selection: done earlier, skipped" in logged
    want, got = weights(straight["final_model"]), weights(resumed["final_model"])
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))  # by name, not by position
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-6), name


def test_a_directory_holding_another_run_is_refused(workspace):
    root, base, data = workspace
    Pipeline(config(root, base, data, "guarded", rounds=0, sft_epochs=0.5), verbose=False).run()
    with pytest.raises(ValueError, match="other settings .*lam"):
        Pipeline(config(root, base, data, "guarded", rounds=0, sft_epochs=0.5, lam=0.7),
                 verbose=False).run()


def test_starting_from_a_weak_strong_pair_skips_the_warm_up(workspace):
    root, base, data = workspace
    report = Pipeline(config(root, base, data, "pair", base_model=None, weak_model=base,
                             strong_model=base, rounds=1, train_weak=False, gap_threshold=0.0),
                      verbose=False).run()
    assert [s["stage"] for s in report["stages"]] == ["round-1/selection", "round-1/train"]


def test_bad_configurations_are_refused(workspace):
    root, base, data = workspace
    with pytest.raises(ValueError, match="base_model .* or both weak_model and strong_model"):
        PipelineConfig(output_dir=str(root / "x"), data=data)
    with pytest.raises(ValueError, match="not both"):
        PipelineConfig(output_dir=str(root / "x"), data=data, base_model=base, weak_model=base)
    with pytest.raises(ValueError, match="rounds"):
        PipelineConfig(output_dir=str(root / "x"), data=data, weak_model=base, strong_model=base,
                       rounds=0)


def test_demo_code_path_at_reduced_size(tmp_path):
    settings = DemoSettings(train_size=120, eval_size=20, hidden_size=32, num_layers=1,
                            batch_size=16, pretrain_size=60)
    lines = []
    result = run_demo(str(tmp_path), settings, log=lines.append)
    assert 0 <= result.sft_accuracy <= 1 and 0 <= result.wmss_accuracy <= 1
    assert 0 < result.active_size <= 120 and result.eval_size == 20
    assert "WMSS (1 SFT epoch + 1 WMSS epoch" in result.summary_line()
    assert "SFT (2 epochs)" in result.summary_line()
    assert any("held-out" in line for line in lines)


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ("demo", "train", "select"):
        assert command in text


# ---- the recipe, checked by its results ------------------------------------------------------

class _Recorder:
    """Records what every WMSSTrainer of a run trained on and what its pair held afterwards."""

    def __init__(self):
        self.runs = []

    def install(self, patch):
        original = WMSSTrainer.train
        recorder = self

        def train(trainer, *args, **kwargs):
            result = original(trainer, *args, **kwargs)
            pair = trainer.model
            recorder.runs.append({
                "dataset": list(trainer.train_dataset),
                "strong": {k: v.detach().clone() for k, v in pair.strong.state_dict().items()},
                "weak": {k: v.detach().clone() for k, v in pair.weak.state_dict().items()}})
            return result

        patch.setattr(WMSSTrainer, "train", train)


def _encoded(data, model_dir, max_length=64):
    from transformers import AutoTokenizer

    from wmss.recipe.data import load_dataset_file

    return load_dataset_file(data, AutoTokenizer.from_pretrained(model_dir), max_length)


def _same_state(saved: dict, expected: dict) -> bool:
    """State dicts compared key by key (tied weights may be stored once)."""
    return all(torch.equal(saved[k], expected[k]) for k in saved) and set(saved) <= set(expected)


@pytest.fixture(scope="module")
def recorded_round(workspace):
    """One SFT + one WMSS round with non-default WD-DS options, every trainer recorded."""
    root, base, data = workspace
    recorder = _Recorder()
    with pytest.MonkeyPatch.context() as patch:
        recorder.install(patch)
        settings = config(root, base, data, "recorded", rounds=1, normalize="per_term",
                          entropy_term="weak", seed=3)
        report = Pipeline(settings, verbose=False).run()
    return settings, report, recorder.runs[0]


def test_the_round_model_is_the_trained_strong_model(recorded_round):
    settings, report, trained = recorded_round
    saved = weights(report["final_model"])
    assert _same_state(saved, trained["strong"])
    assert not _same_state(saved, trained["weak"])
    # Trained, not the strong model the round started from (M1, the SFT's output).
    assert not _same_state(saved, weights(os.path.join(settings.output_dir, "sft", "model")))


def test_joint_training_runs_on_the_active_set_alone(recorded_round):
    settings, report, trained = recorded_round
    out = settings.output_dir
    active = json.loads(open(os.path.join(out, "round-1", "selection", "active_indices.json")).read())
    dataset = _encoded(settings.data, os.path.join(out, "sft", "model"))
    assert 0 < len(active) < len(dataset)
    assert trained["dataset"] == [dataset[i] for i in active]


def test_the_selection_follows_every_wd_ds_option_and_draws_the_data_set_size(recorded_round):
    from wmss.recipe import selection

    settings, report, _ = recorded_round
    stage = os.path.join(settings.output_dir, "round-1", "selection")
    scores = selection.DatasetScores.load(os.path.join(stage, "scores.json"))
    active = json.loads(open(os.path.join(stage, "active_indices.json")).read())
    n = len(scores)

    summary = json.loads(open(os.path.join(stage, "selection_summary.json")).read())

    def expected(**options):  # what the selection of these options must report
        settings = dict(normalize="per_term", entropy_term="weak", seed=3, num_draws=n)
        chosen = selection.select_active(scores, selection.SelectionOptions(**{**settings,
                                                                              **options}))
        return chosen.active.tolist(), chosen.summary["expected_selected"]

    want_active, want_expected = expected()
    assert active == want_active
    assert summary["expected_selected"] == pytest.approx(want_expected, rel=1e-12)
    assert summary["num_draws"] == n and summary["seed"] == 3  # |D| draws by default
    # Each option is visible in the result: any other choice reports another expectation.
    for other in (dict(normalize="paper"), dict(entropy_term="strong"), dict(num_draws=n - 1)):
        assert summary["expected_selected"] != pytest.approx(expected(**other)[1], rel=1e-9)
    assert summary["options"]["normalize"] == "per_term"
    assert summary["options"]["entropy_term"] == "weak"


def test_a_rerun_with_another_seed_is_refused(recorded_round):
    settings, _, _ = recorded_round
    with pytest.raises(ValueError, match=r"other settings \(seed\)"):
        Pipeline(dataclasses.replace(settings, seed=4), verbose=False).run()


@pytest.mark.parametrize("option", [
    ["--lam", "1.5"], ["--alpha", "-1"], ["--num-draws", "0"], ["--max-length", "0"],
    ["--gap-threshold", "nan"], ["--lr", "0"], ["--rounds", "-1"], ["--sft-epochs", "0"],
    ["--batch-size", "0"], ["--grad-accum", "0"], ["--warmup-ratio", "1"],
    ["--alpha", "0", "--beta", "0", "--gamma", "0"], ["--seed", "-1"],
    ["--gap-threshold", "inf"],
])
def test_bad_options_are_refused_before_any_work(workspace, monkeypatch, capsys, option):
    root, base, data = workspace
    monkeypatch.setattr("transformers.Trainer.train",
                        lambda *a, **k: pytest.fail("trained despite a bad option"))
    out = root / ("bad" + "_".join(option).replace("-", ""))
    try:
        code = cli.main(["train", "--base", base, "--data", data, "--output-dir", str(out),
                         "--cpu", *option])
    except SystemExit as exit_:  # argparse's refusal of a malformed value
        code = exit_.code
    assert code not in (0, None)
    assert not out.exists()  # nothing recorded: the corrected rerun starts afresh
    message = capsys.readouterr().err
    flag = option[0].lstrip("-").replace("-", "_")
    names = {"lr": "learning_rate", "grad_accum": "gradient_accumulation_steps",
             "batch_size": "batch_size", "num_draws": "num_draws", "sft_epochs": "sft_epochs"}
    assert names.get(flag, flag).split("_")[0] in message.replace("-", "_")


def test_bad_data_is_refused_before_training_and_the_fixed_rerun_runs(workspace, tmp_path,
                                                                     monkeypatch):
    root, base, data = workspace
    broken = tmp_path / "data.jsonl"
    lines = open(data).read().splitlines()
    broken.write_text("\n".join(lines[:3] + ['{"prompt": "1+1=", "completion": null}']) + "\n")
    settings = config(root, base, str(broken), "bad-data", rounds=0, sft_epochs=0.5)
    with monkeypatch.context() as patch:
        patch.setattr("transformers.Trainer.train",
                      lambda *a, **k: pytest.fail("trained on bad data"))
        with pytest.raises(ValueError, match=rf"{broken}:4.*completion"):
            Pipeline(settings, verbose=False).run()
    assert not (root / "bad-data" / "run.json").exists()
    broken.write_text("\n".join(lines) + "\n")  # fixed: the same command now runs
    report = Pipeline(settings, verbose=False).run()
    assert os.path.isdir(report["final_model"])


def test_data_edited_after_the_run_started_is_refused(workspace, tmp_path):
    root, base, data = workspace
    edited = tmp_path / "data.jsonl"
    edited.write_text(open(data).read())
    settings = config(root, base, str(edited), "edited-data", rounds=0, sft_epochs=0.5)
    Pipeline(settings, verbose=False).run()
    lines = open(data).read().splitlines()
    edited.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same records, other order
    with pytest.raises(ValueError, match="data file .* changed since the run"):
        Pipeline(settings, verbose=False).run()


def test_relative_paths_mean_the_same_files_from_any_directory(workspace, tmp_path, monkeypatch):
    root, base, data = workspace
    monkeypatch.chdir(root)
    here = PipelineConfig(output_dir="relative", data=os.path.basename(data),
                          base_model=os.path.basename(base), rounds=0)
    assert here.data == data and here.base_model == base
    assert here.output_dir == str(root / "relative")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / os.path.basename(data)).write_text('{"text": "other data"}\n')
    monkeypatch.chdir(elsewhere)
    assert PipelineConfig(output_dir=str(root / "relative"), data=os.path.basename(data),
                          base_model=base, rounds=0).data == str(elsewhere / "data.jsonl")


def test_a_second_run_in_a_busy_directory_is_refused_and_writes_nothing(workspace, capsys):
    from wmss.io import DirectoryInUseError, directory_lock

    root, base, data = workspace
    out = root / "busy"
    with directory_lock(out, "a run in progress"):
        with pytest.raises(DirectoryInUseError, match="a run in progress"):
            Pipeline(config(root, base, data, "busy", rounds=0), verbose=False).run()
        assert cli.main(["train", "--base", base, "--data", data, "--output-dir", str(out),
                         "--cpu", "--rounds", "0"]) == 1
    assert "in use by another run" in capsys.readouterr().err
    assert os.listdir(out) == [".wmss.lock"]


def test_keep_duplicates_trains_every_draw(workspace, monkeypatch):
    root, base, data = workspace
    recorder = _Recorder()
    recorder.install(monkeypatch)
    settings = config(root, base, data, "duplicates", base_model=None, weak_model=base,
                      strong_model=base, rounds=1, keep_duplicates=True, num_draws=30,
                      wmss_epochs=0.2)
    Pipeline(settings, verbose=False).run()
    active = json.loads((root / "duplicates" / "round-1" / "selection" /
                         "active_indices.json").read_text())
    assert len(active) == 30 and len(set(active)) < 30 and active == sorted(active)
    dataset = _encoded(data, base)
    assert recorder.runs[0]["dataset"] == [dataset[i] for i in active]


def test_a_kill_between_saving_a_model_and_its_report_resumes_from_the_checkpoints(workspace,
                                                                                 monkeypatch):
    import transformers

    import wmss.recipe.pipeline

    root, base, data = workspace
    straight = Pipeline(config(root, base, data, "sft-straight", rounds=0, save_steps=1),
                        verbose=False).run()
    real_write = wmss.recipe.pipeline.atomic_write_json

    def killed_at_the_report(path, *args, **kwargs):
        if str(path).endswith(os.path.join("sft", "report.json")):
            raise KeyboardInterrupt("killed before the report")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(wmss.recipe.pipeline, "atomic_write_json", killed_at_the_report)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(config(root, base, data, "sft-killed", rounds=0, save_steps=1),
                 verbose=False).run()
    assert os.listdir(root / "sft-killed" / "sft" / "checkpoints")  # kept for the rerun
    monkeypatch.setattr(wmss.recipe.pipeline, "atomic_write_json", real_write)

    resumed_from = []
    real_train = transformers.Trainer.train
    monkeypatch.setattr(transformers.Trainer, "train", lambda self, resume_from_checkpoint=None,
                        **kw: resumed_from.append(resume_from_checkpoint) or
                        real_train(self, resume_from_checkpoint=resume_from_checkpoint, **kw))
    rerun = Pipeline(config(root, base, data, "sft-killed", rounds=0, save_steps=1),
                     verbose=False).run()
    assert resumed_from and resumed_from[0] is not None
    assert not (root / "sft-killed" / "sft" / "checkpoints").exists()
    saved = weights(rerun["final_model"])
    for name, want in weights(straight["final_model"]).items():
        assert torch.allclose(saved[name], want, rtol=1e-5, atol=1e-6), name


def _refused_before_any_work(settings, match, monkeypatch):
    """The run raises ``match`` and leaves no run.json behind: the corrected rerun is free."""
    monkeypatch.setattr("transformers.Trainer.train",
                        lambda *a, **k: pytest.fail("trained despite bad input"))
    with pytest.raises(ValueError, match=match):
        Pipeline(settings, verbose=False).run()
    assert not os.path.exists(os.path.join(settings.output_dir, "run.json"))


def test_a_model_path_that_holds_no_model_is_refused_before_any_work(workspace, tmp_path,
                                                                     monkeypatch):
    root, base, data = workspace
    tokenizer_only = tmp_path / "tokenizer-only"
    char_tokenizer().save_pretrained(tokenizer_only)
    for overrides, name in ((dict(base_model=str(tokenizer_only)), "base_model"),
                            (dict(base_model=None, weak_model=base,
                                  strong_model=str(tmp_path / "no-such-model")), "strong_model"),
                            (dict(base_model=data), "base_model")):
        settings = config(root, base, data, f"no-model-{name}", **overrides)
        _refused_before_any_work(settings, rf"{name}: no model can be loaded", monkeypatch)


def test_data_with_nothing_to_train_on_is_refused_before_any_work(workspace, monkeypatch):
    root, base, data = workspace  # every prompt is 4+ tokens: max_length 3 leaves no target
    settings = config(root, base, data, "nothing-supervised", max_length=3)
    _refused_before_any_work(settings, "no record has a supervised token .*max_length=3",
                             monkeypatch)


def test_extra_training_args_are_checked_before_any_work(workspace, monkeypatch):
    root, base, data = workspace
    with pytest.raises(ValueError, match=r"\['seed'\] are set by the pipeline.*seed -> seed"):
        config(root, base, data, "extra", extra_training_args={"seed": 1})
    settings = config(root, base, data, "extra", extra_training_args={"lr_scheduler_type": "x"})
    _refused_before_any_work(settings, "extra_training_args: TrainingArguments refuses",
                             monkeypatch)


def test_an_identical_rerun_continues_whatever_json_makes_of_the_settings(workspace):
    root, base, data = workspace
    settings = config(root, base, data, "tuple-settings", rounds=0, sft_epochs=0.5,
                      extra_training_args={"label_names": ("labels",)})
    Pipeline(settings, verbose=False).run()
    logged = []
    Pipeline(settings, log=logged.append, verbose=False).run()  # a tuple comes back a list
    assert "[wmss] sft: done earlier, skipped" in logged


@pytest.mark.parametrize("damage", ["", "[1, 2]", "{not json"])
def test_a_damaged_record_of_the_run_is_named(workspace, damage):
    root, base, data = workspace
    settings = config(root, base, data, "damaged", rounds=0, sft_epochs=0.5)
    Pipeline(settings, verbose=False).run()
    report = root / "damaged" / "sft" / "report.json"
    original = report.read_text()
    report.write_text(damage)
    try:
        with pytest.raises(ValueError, match=rf"{report} is damaged .*delete {report.parent}"):
            Pipeline(settings, verbose=False).run()
    finally:
        report.write_text(original)


def test_a_damaged_active_set_is_named(recorded_round, tmp_path):
    settings, _, _ = recorded_round
    path = os.path.join(settings.output_dir, "round-1", "selection", "active_indices.json")
    original = open(path).read()
    try:
        for damage in ("[]", "[0, 1000]", '["a"]'):
            with open(path, "w") as handle:
                handle.write(damage)
            with pytest.raises(ValueError, match=rf"{path} is damaged .*record indices"):
                Pipeline(settings, verbose=False).run()
    finally:
        with open(path, "w") as handle:
            handle.write(original)


def test_a_kept_demo_directory_refuses_another_demo_before_rewriting_its_data(tmp_path):
    small = dict(eval_size=20, hidden_size=32, num_layers=1, batch_size=16, pretrain_size=0)
    run_demo(str(tmp_path), DemoSettings(train_size=60, **small), log=lambda line: None)
    data = (tmp_path / "seed-0" / "train.jsonl").read_text()  # one folder per seed
    with pytest.raises(ValueError, match=r"holds a demo with other settings \(train_size\)"):
        run_demo(str(tmp_path), DemoSettings(train_size=50, **small), log=lambda line: None)
    assert (tmp_path / "seed-0" / "train.jsonl").read_text() == data
    assert cli.main(["demo", "--output-dir", str(tmp_path), "--train-size", "50"]) == 1


def test_every_model_produced_has_its_logit_statistics_recorded(recorded_round):
    """The SFT model and the round's strong model: the means of wmss.logit_stats over the data
    set in their stage reports, equal to inspecting the saved models, and round by round in the
    run's report."""
    from wmss.recipe.inspect import STATISTICS, inspect_models

    settings, report, _ = recorded_round
    out = settings.output_dir
    dataset = _encoded(settings.data, os.path.join(out, "sft", "model"))
    produced = report["logit_stats"]
    assert [entry["stage"] for entry in produced] == ["sft", "round-1/train"]
    assert [entry["model"] for entry in produced] == [os.path.join(out, "sft", "model"),
                                                      os.path.join(out, "round-1", "model")]
    for entry in produced:
        stage = json.loads(open(os.path.join(out, entry["stage"], "report.json")).read())
        recorded = stage["logit_stats"]
        assert {k: v for k, v in entry.items() if k not in ("stage", "model")} == recorded
        fresh = inspect_models(AutoModelForCausalLM.from_pretrained(entry["model"]), dataset,
                               backend="torch")
        assert recorded["supervised_tokens"] == fresh["supervised_tokens"] > 0
        for name in STATISTICS:
            assert recorded[name] == pytest.approx(fresh["means"]["strong"][name], rel=1e-4,
                                                   abs=1e-5), (entry["stage"], name)
    # Training moved the statistics: the round's model is not the SFT model.
    assert produced[0]["mean_nontarget_logit"] != produced[1]["mean_nontarget_logit"]


def test_a_rerun_of_a_finished_run_reports_the_same_statistics(recorded_round):
    settings, report, _ = recorded_round
    logged = []
    again = Pipeline(settings, log=logged.append, verbose=False).run()
    assert "[wmss] round-1/train: done earlier, skipped" in logged
    assert again["logit_stats"] == report["logit_stats"]


# ---- plots, progress and the demo over several seeds (#15 parts 3 and 4) ---------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bytes(path) -> bytes:
    data = open(path, "rb").read()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path
    return data


def test_every_stage_is_plotted_from_what_its_report_holds(recorded_round):
    from wmss.recipe import plots

    settings, report, _ = recorded_round
    out = settings.output_dir
    assert report["plots"] == [os.path.join(out, path) for path in (
        "sft/loss.png", "round-1/selection/selection.png", "round-1/train/loss.png",
        "round-1/train/entropy.png")]
    saved = json.loads(open(os.path.join(out, "report.json")).read())
    assert saved["plots"] == report["plots"]
    drawn = {path: _png_bytes(path) for path in report["plots"]}
    # The curves are the stage report's per-step log: one point per logged optimizer step.
    train = json.loads(open(os.path.join(out, "round-1", "train", "report.json")).read())
    steps = [entry for entry in train["log"] if "loss" in entry]
    assert len(steps) == train["steps"] >= 2  # logging_steps=1
    curves = plots.loss_data(train)
    assert curves["step"] == [entry["step"] for entry in steps] == list(range(1, len(steps) + 1))
    for name in ("loss", "strong_loss", "weak_loss"):
        assert curves[name] == [entry[name] for entry in steps]
    statistics = plots.entropy_data(train)
    for name in ("entropy_strong", "entropy_weak", "mixed_fraction"):
        assert statistics[name] == [entry[name] for entry in steps] and len(statistics[name])
    # Drawn from files only: redrawing the finished run gives the same bytes, and so does a
    # rerun, whose stages were all done earlier.
    again = plots.plot_run(out)
    assert sorted(p for paths in again.values() for p in paths) == sorted(drawn)
    for path, data in drawn.items():
        assert open(path, "rb").read() == data, path
    assert Pipeline(settings, verbose=False).run()["plots"] == report["plots"]
    for path, data in drawn.items():
        assert open(path, "rb").read() == data, path


def test_a_run_without_matplotlib_finishes_and_says_plots_were_skipped(workspace, monkeypatch):
    import builtins

    root, base, data = workspace
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    logged = []
    report = Pipeline(config(root, base, data, "no-matplotlib", base_model=None,
                             weak_model=base, strong_model=base, rounds=1, wmss_epochs=0.5),
                      log=logged.append, verbose=False).run()
    skipped = [line for line in logged if "plots skipped" in line]
    assert skipped == ["[wmss] plots skipped: matplotlib is not installed (No module named "
                       "'matplotlib'; pip install matplotlib)"]
    assert report["plots"] == [] and os.path.isdir(report["final_model"])
    pngs = [name for _, _, names in os.walk(root / "no-matplotlib") for name in names
            if name.endswith(".png")]
    assert pngs == []


def test_a_failing_plot_is_one_line_and_the_run_goes_on(workspace, monkeypatch):
    from wmss.recipe import plots

    root, base, data = workspace

    def broken(stage_dir, report):
        raise RuntimeError("no room on the canvas")

    monkeypatch.setattr(plots, "plot_stage", broken)
    logged = []
    report = Pipeline(config(root, base, data, "broken-plot", rounds=0, sft_epochs=0.5),
                      log=logged.append, verbose=False).run()
    assert "[wmss] sft: plots skipped (RuntimeError: no room on the canvas)" in logged
    assert report["plots"] == [] and os.path.isdir(report["final_model"])


TINY_DEMO = ["--train-size", "60", "--eval-size", "12", "--hidden-size", "32",
             "--num-layers", "1", "--batch-size", "16", "--pretrain-size", "20"]


def test_demo_over_two_seeds_reports_both_arms_mean_and_spread(tmp_path, capsys):
    import re
    import statistics

    from wmss.recipe import plots
    from wmss.recipe.inspect import STATISTICS

    out = tmp_path / "demo"
    assert cli.main(["demo", "--output-dir", str(out), "--seeds", "2", "--seed", "5",
                     *TINY_DEMO]) == 0
    captured = capsys.readouterr()
    runs = [json.loads((out / f"seed-{seed}" / "result.json").read_text()) for seed in (5, 6)]
    for run in runs:  # every seed's runs are kept, each in its own folder
        assert (out / f"seed-{run['seed']}" / "sft-1-wmss-1" / "round-1" / "model").is_dir()
    summary = json.loads((out / "demo_result.json").read_text())
    assert summary["seeds"] == [5, 6] and summary["runs"] == runs
    for arm in ("sft", "wmss"):
        for metric in ("accuracy", "loss"):
            a, b = (run[f"{arm}_{metric}"] for run in runs)
            assert summary["mean"][arm][metric] == pytest.approx((a + b) / 2, rel=1e-12)
            # The sample standard deviation (n - 1): |a - b| / sqrt(2) for two values.
            assert summary["std"][arm][metric] == pytest.approx(abs(a - b) / 2 ** 0.5,
                                                                rel=1e-12, abs=1e-15)
    loss = summary["mean"]["wmss"]["loss"], summary["std"]["wmss"]["loss"]
    assert f"held-out loss WMSS {loss[0]:.4f} +- {loss[1]:.4f}" in captured.out
    assert "over 2 seeds (mean +- sample std)" in captured.out
    # Both arms' logit statistics, side by side: the mean over the seeds of each arm's final
    # model's statistics, as the pipeline reports recorded them.
    header = next(line for line in captured.out.splitlines() if line.startswith("statistic"))
    assert header.split() == ["statistic", "SFT", "WMSS"]
    for name in STATISTICS:
        row = next(line for line in captured.out.splitlines() if line.startswith(name + " "))
        want = [statistics.fmean(run["logit_stats"][arm][name] for run in runs)
                for arm in ("sft", "wmss")]
        assert [float(v) for v in row.split()[1:]] == pytest.approx(want, abs=1e-4)
    # The comparison picture, of these per-seed values.
    assert summary["plot"] == str(out / "comparison.png")
    assert _png_bytes(summary["plot"])
    drawn = plots.demo_comparison_data(summary)
    assert drawn["accuracy"]["wmss"] == [100 * run["wmss_accuracy"] for run in runs]
    # Progress from the start, on stderr: stage lines and step/rate/time-left lines.
    progress = captured.err.splitlines()
    assert progress[0] == "[demo] seed 5, base M0 | 20 examples from " + str(
        out / "seed-5" / "pretrain.jsonl")
    assert "[demo] seed 6, WMSS arm | round-1/selection: running" in progress
    step = re.compile(r"^\[demo\] seed (5|6), (base M0|SFT arm|WMSS arm) \| (sft|round-1/train): "
                      r"step (\d+)/(\d+) \((\d+\.\d) steps/s, (\d+ s|\d+ min \d\d s) left\)$")
    steps = [step.match(line) for line in progress if ": step " in line]
    assert steps and all(steps), progress
    assert {(m.group(2), m.group(3)) for m in steps} == {
        ("base M0", "sft"), ("SFT arm", "sft"), ("WMSS arm", "sft"), ("WMSS arm", "round-1/train")}
    # Another seed count is another demo: refused before anything is written.
    with pytest.raises(ValueError, match=r"holds a demo with other settings \(seeds\)"):
        run_demo(str(out), DemoSettings(train_size=60, eval_size=12, hidden_size=32,
                                        num_layers=1, batch_size=16, pretrain_size=20, seed=5,
                                        seeds=3), log=lambda line: None)
    assert not (out / "seed-7").exists()


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_demo_refuses_a_seed_count_below_one_by_name(tmp_path, capsys, seeds):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output-dir", str(out), "--seeds", seeds]) == 1
    assert f"seeds must be >= 1, got {seeds}" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        DemoSettings(seeds=0)
    with pytest.raises(TypeError, match="seeds must be an int"):
        DemoSettings(seeds=1.5)
