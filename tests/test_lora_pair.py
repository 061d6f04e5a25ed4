"""A LoRA pair on one base model: ``apply_wmss(peft_model, "base")`` and
``apply_wmss(peft_model, "adapter:NAME")`` hold one copy of the base weights and train exactly what
two separate models built from the merged weights would."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import wmss
from wmss.recipe.toy import tiny_causal_lm

peft = pytest.importorskip("peft")

VOCAB, TARGETS = 61, ["q_proj", "v_proj", "down_proj"]
RANK, ALPHA = 4, 8


def lora(init=False):
    """A LoRA config; ``init=False`` gives a non-zero B (the adapter changes the model)."""
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                           init_lora_weights=init)


def peft_pair_model(seed=0, weak_init=False, base=None):
    """A PEFT model with the strong adapter "default" and a second adapter "weak"."""
    torch.manual_seed(seed)
    base = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, seed=seed) if base is None \
        else base
    model = peft.get_peft_model(base, lora())
    model.add_adapter("weak", lora(init=weak_init))
    model.set_adapter("default")
    return model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, :3] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def merged(model, adapter):
    """A separate transformers model: a copy of the base with ``adapter`` merged (None: none)."""
    model = copy.deepcopy(model)
    model = model.unload() if adapter is None else model.merge_and_unload(adapter_names=[adapter])
    return model.requires_grad_(True)  # PEFT froze the base; the reference trains every weight


def expected_lora_grads(peft_model, adapter, merged_model):
    """dL/dA and dL/dB of ``adapter`` from the merged model's weight gradients G:
    W = W0 + s B A gives dL/dB = s G A^T and dL/dA = s B^T G."""
    scaling = ALPHA / RANK
    merged_modules = dict(merged_model.named_modules())
    expected = {}
    for name, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            grad = merged_modules[name].weight.grad
            expected[a] = scaling * b.detach().t() @ grad
            expected[b] = scaling * grad @ a.detach().t()
    assert expected
    return expected


def assert_close(got, want, what, tol=1e-5):
    error = (got - want).norm() / want.norm().clamp(min=1e-30)
    assert error < tol, f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("weak", ["base", "adapter:weak"])
def test_loss_and_adapter_gradients_equal_two_separate_merged_models(weak):
    model = peft_pair_model()
    pair = wmss.apply_wmss(model, weak, lam=0.3)
    weak_adapter = None if weak == "base" else "weak"
    strong_ref, weak_ref = merged(model, "default"), merged(model, weak_adapter)
    reference = wmss.apply_wmss(strong_ref, weak_ref, lam=0.3, train_weak=weak != "base")

    out, out_ref = pair(**batch()), reference(**batch())
    assert_close(out.loss, out_ref.loss, "loss")
    assert_close(out.entropy_weak, out_ref.entropy_weak, "weak entropy")
    out.loss.backward()
    out_ref.loss.backward()
    want = expected_lora_grads(model, "default", strong_ref)
    if weak_adapter is not None:
        want.update(expected_lora_grads(model, weak_adapter, weak_ref))
    trained = [p for p in pair.parameters() if p.grad is not None]
    assert len(trained) == len(want)  # the adapters' matrices, nothing of the base
    for parameter, expected in want.items():
        assert_close(parameter.grad, expected, "adapter gradient")


def test_the_pair_holds_one_base_plus_the_adapters():
    model = peft_pair_model()
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if "lora_" not in n)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                        if "lora_" in n)
    own = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, seed=0)
    assert base_bytes == sum(p.numel() * p.element_size() for p in own.parameters())
    for weak in ("base", "adapter:weak"):
        pair = wmss.apply_wmss(model, weak)
        pair_bytes = sum(p.numel() * p.element_size() for p in pair.parameters())
        assert pair_bytes == base_bytes + adapter_bytes
        assert list(pair.models_with_weights()) == ["strong"]


def test_a_zero_initialised_weak_adapter_is_exactly_the_base():
    model = peft_pair_model(weak_init=True)  # B = 0: the weak adapter changes nothing yet (M0)
    as_adapter = wmss.apply_wmss(model, "adapter:weak")
    as_base = wmss.apply_wmss(model, "base")
    with torch.no_grad():
        a, b = as_adapter(**batch(), return_stats=True), as_base(**batch(), return_stats=True)
    assert torch.equal(a.stats.entropy_weak, b.stats.entropy_weak)
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("weak, trains_weak_adapter", [("base", False), ("adapter:weak", True)])
def test_a_step_trains_the_adapters_and_leaves_the_base_alone(weak, trains_weak_adapter):
    model = peft_pair_model()
    pair = wmss.apply_wmss(model, weak)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in pair.parameters() if p.requires_grad], lr=0.5)
    pair(**batch()).loss.backward()
    optimizer.step()
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}, \
        "the forward's adapter switches must leave every requires_grad as it was"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any(".default." in n for n in changed)
    assert any(".weak." in n for n in changed) == trains_weak_adapter


def test_a_frozen_weak_adapter_gets_no_gradient():
    model = peft_pair_model()
    pair = wmss.apply_wmss(model, "adapter:weak", train_weak=False)
    pair(**batch()).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".weak." in n)
    assert any(p.grad is not None for n, p in model.named_parameters() if ".default." in n)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_saving_writes_a_loadable_adapter_or_a_merged_model(tmp_path):
    base = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, seed=0)
    base.save_pretrained(tmp_path / "base")
    model = peft_pair_model(base=AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    pair = wmss.apply_wmss(model, "adapter:weak")
    ids = batch()["input_ids"]
    strong_logits = logits(model, ids)
    pair.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")  # base + adapter
    assert torch.allclose(logits(loaded, ids), strong_logits, atol=1e-5)
    pair.save_pretrained(tmp_path / "merged", merged=True)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in n for n, _ in full.named_parameters())
    assert torch.allclose(logits(full, ids), strong_logits, atol=1e-5)
    # The pair's own model is not merged in place: still two adapters, same logits.
    assert torch.equal(logits(model, ids), strong_logits)
    assert sorted(model.peft_config) == ["default", "weak"]


def test_a_trainer_checkpoint_of_a_lora_pair_holds_the_model_once_and_restores_both_adapters(
        tmp_path):
    model = peft_pair_model()
    pair = wmss.apply_wmss(model, "adapter:weak")
    trainer = wmss.WMSSTrainer(pair, wmss.training_arguments(str(tmp_path / "run"), use_cpu=True,
                                                              report_to=[]))
    trainer._save(str(tmp_path / "checkpoint"))
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir() if p.is_dir()) == ["strong"]
    # The adapters alone: no copy of the base weights, the weak adapter in a folder of its own.
    from safetensors.torch import load_file

    strong = tmp_path / "checkpoint" / "strong"
    assert not (strong / "model.safetensors").exists()
    for folder in (strong, strong / "weak"):
        keys = load_file(str(folder / "adapter_model.safetensors")).keys()
        assert keys and all("lora_" in k for k in keys)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint"))
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())


def test_bad_lora_pairs_are_refused_by_name():
    model = peft_pair_model()
    plain = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, seed=0)
    with pytest.raises(ValueError, match="names a part of a PEFT model, but strong_model is a "
                                         "LlamaForCausalLM"):
        wmss.apply_wmss(plain, "base")
    with pytest.raises(ValueError, match="has no adapter 'nope' \\(it has \\['default', 'weak'\\]"):
        wmss.apply_wmss(model, "adapter:nope")
    with pytest.raises(ValueError, match="is the strong model's own active adapter"):
        wmss.apply_wmss(model, "adapter:default")
    with pytest.raises(ValueError, match="train_weak=True cannot train weak_model='base'"):
        wmss.apply_wmss(model, "base", train_weak=True)
    with pytest.raises(ValueError, match="'base' or 'adapter:NAME'"):
        wmss.apply_wmss(model, "weak")
    with pytest.raises(TypeError, match="train_weak must be True or False"):
        wmss.apply_wmss(model, "adapter:weak", train_weak="no")


def test_activation_checkpointing_is_refused_with_a_trained_weak_adapter_and_works_with_base():
    pair = wmss.apply_wmss(peft_pair_model(), "adapter:weak")
    with pytest.raises(ValueError, match="activation checkpointing cannot be used with "
                                         "weak_model='adapter:NAME'"):
        pair.activation_checkpointing_enable()
    # Turned on behind the pair's back: the forward refuses rather than mistrain.
    inner = pair.strong.get_base_model()
    enable = getattr(inner, "activation_checkpointing_enable", None) or \
        inner.gradient_checkpointing_enable
    enable()
    pair.train()
    with pytest.raises(ValueError, match="activation checkpointing cannot be used"):
        pair(**batch())
    # With the base as the weak model, nothing of the weak forward is recomputed: allowed, and the
    # gradients are those without checkpointing.
    model = peft_pair_model()
    plain = wmss.apply_wmss(model, "base")
    plain(**batch()).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    plain.train()
    plain.activation_checkpointing_enable()
    plain(**batch()).loss.backward()
    for n, p in model.named_parameters():
        if n in want:
            assert_close(p.grad, want[n], n)


def test_trl_trains_a_lora_pair_and_refuses_to_wrap_a_pair_in_peft(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from wmss.recipe.toy import char_tokenizer

    tokenizer = char_tokenizer()
    records = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                           learning_rate=1e-2, report_to="none", use_cpu=True,
                           save_strategy="no", disable_tqdm=True, bf16=False,
                           gradient_checkpointing=False)  # TRL's default; refused here (above)
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, seed=0)
    model = peft_pair_model(base=base)
    pair = wmss.apply_wmss(model, "adapter:weak")
    data = datasets.Dataset.from_list(records)
    with pytest.raises(ValueError, match="peft_config: WMSSSFTTrainer does not wrap the pair"):
        wmss.WMSSSFTTrainer(model=pair, args=config, train_dataset=data,
                            processing_class=tokenizer, peft_config=lora())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wmss.WMSSSFTTrainer(model=pair, args=config, train_dataset=data,
                        processing_class=tokenizer).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".default." in n for n in changed) and any(".weak." in n for n in changed)
    assert all("lora_" in n for n in changed)


def test_a_refused_lora_pair_leaves_the_peft_model_as_it_was():
    model = peft_pair_model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="lam"):
        wmss.apply_wmss(model, "adapter:weak", lam=2.0)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
