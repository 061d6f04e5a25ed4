"""``wmss train --lora``: the recipe with both models as LoRA adapters of one base model."""

import hashlib
import json
import os
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from wmss import commands as cli
from wmss.recipe import selection
from wmss.recipe.data import load_dataset_file
from wmss.recipe.pipeline import Pipeline, PipelineConfig
from pipeline_fixtures import prompt_records, tiny_workspace
from wmss.recipe.toy import char_tokenizer

peft = pytest.importorskip("peft")

RANK = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-pipeline")
    return (root, *tiny_workspace(root, prompt_records(12)))


def config(root, base, data, name, **overrides):
    settings = dict(output_dir=str(root / name), data=data, base_model=base, rounds=2,
                    learning_rate=1e-2, batch_size=4, gradient_accumulation_steps=1,
                    max_length=64, save_steps=50, use_cpu=True, lora_rank=RANK)
    settings.update(overrides)
    return PipelineConfig(**settings)


def file_sha256(folder) -> dict:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(folder))}


def logits(model, ids=torch.tensor([[3, 5, 7, 9, 11]])) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_run(workspace):
    root, base, data = workspace
    before = file_sha256(root / "base")
    settings = config(root, base, data, "run")
    report = Pipeline(settings, verbose=False).run()
    return settings, report, before


def test_every_model_of_a_lora_run_is_an_adapter_of_the_base(lora_run):
    settings, report, _ = lora_run
    out = settings.output_dir
    for stage in ("sft", "round-1", "round-2"):
        folder = os.path.join(out, stage, "model")
        adapter = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
        assert adapter["base_model_name_or_path"] == settings.base_model
        assert adapter["r"] == RANK and adapter["lora_alpha"] == 2 * RANK
        from safetensors.torch import load_file

        keys = load_file(os.path.join(folder, "adapter_model.safetensors")).keys()
        assert keys and all("lora_" in k for k in keys)  # adapter weights only, no base copy
        assert not any(".weak." in k for k in keys)      # and the strong adapter alone
    assert report["final_model"] == os.path.join(out, "round-2", "model")


def test_a_lora_run_leaves_the_base_model_untouched_and_trains_each_adapter(lora_run, workspace):
    settings, report, before = lora_run
    root, base, _ = workspace
    assert file_sha256(root / "base") == before
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base))
    previous = base_logits
    for stage in ("sft", "round-1", "round-2"):  # each stage moved its model on
        current = logits(AutoModelForCausalLM.from_pretrained(
            os.path.join(settings.output_dir, stage, "model")))
        assert (current - previous).abs().max() > 1e-4, stage
        previous = current


def test_each_rounds_selection_scores_its_own_pair_of_adapters(lora_run):
    """Round 1: strong = the SFT adapter, weak = the base; round 2: strong = round 1's adapter,
    weak = the SFT adapter (weak = M_{t-1}, strong = M_t, as in the full-weight recipe)."""
    settings, report, _ = lora_run
    out = settings.output_dir
    dataset = load_dataset_file(settings.data, char_tokenizer(), settings.max_length)
    pairs = {"round-1": ("sft/model", settings.base_model),
             "round-2": ("round-1/model", "sft/model")}
    for stage, (strong, weak) in pairs.items():
        models = [AutoModelForCausalLM.from_pretrained(os.path.join(out, source))
                  for source in (strong, weak)]
        expected = selection.score_dataset(*models, dataset, progress=False, backend="torch")
        saved = selection.DatasetScores.load(os.path.join(out, stage, "selection", "scores.json"))
        torch.testing.assert_close(saved.entropy_strong, expected.entropy_strong)
        torch.testing.assert_close(saved.entropy_weak, expected.entropy_weak)


def round_pair(settings, weak, strong):
    """The pair ``Pipeline`` trains in a round (built as ``_joint_train`` builds it)."""
    from wmss.hf.pair import apply_wmss

    pipeline = Pipeline(settings, verbose=False)
    model, weak_name = pipeline._lora_models(weak, strong)
    return apply_wmss(model, weak_name, train_weak=settings.train_weak, backend="torch")


@pytest.mark.parametrize("train_weak", [True, False], ids=["trained-weak", "frozen-weak"])
def test_a_rounds_pair_is_one_base_with_the_strong_and_weak_adapters(lora_run, train_weak):
    settings, report, _ = lora_run
    out = settings.output_dir
    settings = config(pathlib.Path(out).parent, settings.base_model, settings.data, "unused",
                      train_weak=train_weak)
    load = AutoModelForCausalLM.from_pretrained
    # Round 1: the weak model is the base (a zero-initialised adapter, or no adapter at all).
    pair = round_pair(settings, settings.base_model, os.path.join(out, "sft", "model"))
    torch.testing.assert_close(logits(pair.strong), logits(load(os.path.join(out, "sft", "model"))))
    with pair._weak_active():
        torch.testing.assert_close(logits(pair.weak.peft_model), logits(load(settings.base_model)),
                                   rtol=0, atol=0)
    weak_trained = [p for n, p in pair.named_parameters() if ".weak." in n and p.requires_grad]
    assert bool(weak_trained) == train_weak
    assert pair.weak.description == ("adapter:weak" if train_weak else "base")
    # Round 2: the weak model is the SFT adapter, trained or frozen as asked.
    pair = round_pair(settings, os.path.join(out, "sft", "model"),
                      os.path.join(out, "round-1", "model"))
    torch.testing.assert_close(logits(pair.strong),
                               logits(load(os.path.join(out, "round-1", "model"))))
    with pair._weak_active():
        torch.testing.assert_close(logits(pair.weak.peft_model),
                                   logits(load(os.path.join(out, "sft", "model"))))
    weak = [p for n, p in pair.named_parameters() if ".weak." in n]
    assert weak and all(p.requires_grad == train_weak for p in weak)
    strong = [p for n, p in pair.named_parameters() if ".default." in n]
    assert strong and all(p.requires_grad for p in strong)
    base_weights = [p for n, p in pair.named_parameters() if "lora_" not in n]
    assert base_weights and not any(p.requires_grad for p in base_weights)


@pytest.mark.parametrize("overrides, message", [
    (dict(base_model=None, weak_model="BASE", strong_model="BASE"),
     "lora_rank: a LoRA run starts"),
    (dict(deepspeed_config={"zero_optimization": {"stage": 3}}, use_cpu=False),
     "lora_rank with deepspeed_config"),
    (dict(activation_checkpointing=True), "needs train_weak=False"),
    (dict(lora_rank=0), "lora_rank"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_alpha=-1.0), "lora_alpha"),
    (dict(lora_rank=None, lora_alpha=8.0), "lora_alpha is set but lora_rank is not"),
])
def test_bad_lora_settings_are_refused_by_name(workspace, overrides, message):
    root, base, data = workspace
    overrides = {k: base if v == "BASE" else v for k, v in overrides.items()}
    with pytest.raises((ValueError, TypeError), match=message):
        config(root, base, data, "refused", **overrides)


def test_wmss_train_lora_options_reach_the_run_and_need_lora(workspace, capsys):
    root, base, data = workspace
    common = ["train", "--base", base, "--data", data, "--max-length", "64", "--cpu"]
    assert cli.main([*common, "--output-dir", str(root / "no-lora"), "--lora-rank", "8"]) == 1
    assert "--lora-rank given without --lora" in capsys.readouterr().err
    out = root / "cli"
    assert cli.main([*common, "--output-dir", str(out), "--rounds", "0", "--sft-epochs", "0.5",
                     "--lora", "--lora-rank", "2", "--lora-alpha", "3", "--lora-targets",
                     "q_proj", "v_proj"]) == 0
    adapter = json.loads((out / "sft" / "model" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 3
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
