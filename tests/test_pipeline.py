"""wmss.pipeline and the ``wmss train`` / ``wmss demo`` commands, end to end on tiny models."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from wmss import cli
from wmss.demo import DemoSettings, run_demo
from wmss.pipeline import Pipeline, PipelineConfig
from wmss.toy import char_tokenizer, tiny_causal_lm
from wmss.trainer import WMSSTrainer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny base model with its tokenizer, and a small JSONL of both record kinds."""
    root = tmp_path_factory.mktemp("pipeline")
    tokenizer = char_tokenizer()
    base = root / "base"
    tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=1,
                   seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = root / "data.jsonl"
    with open(data, "w") as handle:
        for a in range(12):
            handle.write(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n")
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"{a}*2"},
                                                  {"role": "assistant", "content": str(2 * a)}]}) + "\n")
    return root, str(base), str(data)


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
    assert os.listdir(checkpoints) == ["checkpoint-1"]
    assert (root / "interrupted" / "sft" / "report.json").exists()
    monkeypatch.setattr(WMSSTrainer, "training_step", original)

    logged = []
    resumed = Pipeline(config(root, base, data, "interrupted", save_steps=1), log=logged.append,
                       verbose=False).run()
    assert "[wmss] sft: done earlier, skipped" in logged
    assert "[wmss] round-1/selection: done earlier, skipped" in logged
    for (name, want), got in zip(weights(straight["final_model"]).items(),
                                 weights(resumed["final_model"]).values()):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name


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
