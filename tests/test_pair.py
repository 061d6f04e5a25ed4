"""wmss.apply_wmss on real transformers architectures: loss and every parameter gradient of both
models against the unfused formula on the models' own logits."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import wmss
from wmss.recipe.toy import tiny_causal_lm

VOCAB = 101

# model_type -> config overrides that exercise the family's head (tied embeddings, soft-capping,
# logit scales).
ARCHITECTURES = {
    "llama": dict(),
    "qwen2": dict(),
    "qwen3": dict(tie_word_embeddings=True),
    "mistral": dict(),
    "gemma2": dict(final_logit_softcapping=5.0),
    "gemma3_text": dict(final_logit_softcapping=8.0),
    "phi3": dict(),
    "cohere": dict(logit_scale=0.5),
    "granite": dict(logits_scaling=3.0),
}


def batch(seed=0, batch_size=3, seq=11):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (batch_size, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0          # left padding on one row
    attention_mask[1, -2:] = 0         # right padding on another
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[2, :5] = -100               # an unsupervised prompt
    return input_ids, attention_mask, labels


def unfused_loss(strong, weak, input_ids, attention_mask, labels, lam):
    """The method's authors' way: both models' full logits, mixed, shifted cross-entropy."""
    z_s = strong(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    z_w = weak(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    z = lam * z_s + (1 - lam) * z_w
    return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_loss_and_every_parameter_gradient_match_the_unfused_formula(model_type):
    overrides = ARCHITECTURES[model_type]
    # Different widths: the weak model need not share the strong model's shape, only its vocabulary.
    strong = tiny_causal_lm(model_type, vocab_size=VOCAB, hidden_size=64, seed=1, **overrides)
    weak = tiny_causal_lm(model_type, vocab_size=VOCAB, hidden_size=32, seed=2, **overrides)
    input_ids, attention_mask, labels = batch()
    lam = 0.3

    expected = unfused_loss(strong, weak, input_ids, attention_mask, labels, lam)
    expected.backward()
    expected_grads = grads(strong), grads(weak)
    strong.zero_grad(set_to_none=True)
    weak.zero_grad(set_to_none=True)

    pair = wmss.apply_wmss(strong, weak, lam=lam)
    out = pair(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    assert math.isclose(out.loss.item(), expected.item(), rel_tol=1e-5)
    for model, want in zip((strong, weak), expected_grads):
        got = grads(model)
        assert got.keys() == want.keys()
        for name in want:
            error = (got[name].double() - want[name]).norm() / want[name].norm().clamp(min=1e-30)
            assert error < 1e-4, f"{model_type} {name}: relative error {error:.2e}"


def test_num_items_in_batch_and_frozen_weak_model():
    strong = tiny_causal_lm("llama", vocab_size=VOCAB, seed=1)
    weak = tiny_causal_lm("llama", vocab_size=VOCAB, seed=2)
    pair = wmss.apply_wmss(strong, weak, train_weak=False)
    assert not any(p.requires_grad for p in weak.parameters())
    input_ids, attention_mask, labels = batch()
    count = int((labels[:, 1:] != -100).sum())
    mean = pair(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    scaled = pair(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                  num_items_in_batch=4 * count).loss
    assert math.isclose(scaled.item(), mean.item() / 4, rel_tol=1e-6)
    scaled.backward()
    assert all(p.grad is None for p in weak.parameters())
    assert all(p.grad is not None for p in strong.parameters())


def test_output_carries_the_fused_statistics():
    strong = tiny_causal_lm("llama", vocab_size=VOCAB, seed=1)
    weak = tiny_causal_lm("llama", vocab_size=VOCAB, seed=2)
    pair = wmss.apply_wmss(strong, weak, lam=0.5, gap_threshold=0.0)
    input_ids, attention_mask, labels = batch()
    out = pair(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
               return_stats=True)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    supervised = shifted != -100
    assert out.stats.mixed.shape == labels.shape
    assert torch.equal(out.stats.mixed & ~supervised, torch.zeros_like(supervised))
    with torch.no_grad():
        z_s = strong(input_ids=input_ids, attention_mask=attention_mask).logits
    ce = F.cross_entropy(z_s[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert math.isclose(out.strong_loss.item(), ce.item(), rel_tol=1e-5)
    assert 0 <= out.mixed_fraction.item() <= 1
    assert "logits" not in out
    # A trainer that reads the logits expects a plain causal LM: it is told which trainer to use.
    with pytest.raises(AttributeError, match="train the pair with wmss.WMSSSFTTrainer"):
        out.logits
    assert getattr(out, "logits", None) is None


def test_save_pretrained_writes_the_strong_model_alone(tmp_path):
    strong = tiny_causal_lm("gemma2", vocab_size=VOCAB, seed=1, final_logit_softcapping=5.0)
    weak = tiny_causal_lm("gemma2", vocab_size=VOCAB, seed=2, final_logit_softcapping=5.0)
    wmss.apply_wmss(strong, weak).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, want), got in zip(strong.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(want, got), name


def test_unsupported_pairs_are_refused_at_apply_time():
    strong = tiny_causal_lm("llama", vocab_size=VOCAB, seed=1)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        wmss.apply_wmss(strong, tiny_causal_lm("llama", vocab_size=VOCAB + 1, seed=2))
    with pytest.raises(ValueError, match="same object"):
        wmss.apply_wmss(strong, strong)
    with pytest.raises(ValueError, match="soft-caps"):
        wmss.apply_wmss(tiny_causal_lm("gemma2", vocab_size=VOCAB, final_logit_softcapping=5.0),
                        tiny_causal_lm("gemma2", vocab_size=VOCAB, final_logit_softcapping=9.0))

    class ScaledLogits(LlamaForCausalLM):  # a head transform wmss does not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    odd = ScaledLogits(strong.config)
    with pytest.raises(ValueError, match="weak model: .* transform"):
        wmss.apply_wmss(strong, odd)

    custom = tiny_causal_lm("llama", vocab_size=VOCAB, seed=3)
    custom.lm_head = torch.nn.Sequential(custom.lm_head)
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        wmss.apply_wmss(strong, custom)
    with pytest.raises(ValueError, match="lam"):
        wmss.apply_wmss(strong, tiny_causal_lm("llama", vocab_size=VOCAB, seed=2), lam=2)


def test_activation_checkpointing_gives_the_same_gradients():
    input_ids, attention_mask, labels = batch()
    results = []
    for checkpointing in (False, True):
        strong = tiny_causal_lm("qwen3", vocab_size=VOCAB, seed=1)
        weak = tiny_causal_lm("qwen3", vocab_size=VOCAB, seed=2)
        pair = wmss.apply_wmss(strong, weak)
        if checkpointing:
            pair.activation_checkpointing_enable()
        pair.train()
        pair(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        results.append(grads(strong) | {f"weak.{k}": v for k, v in grads(weak).items()})
    for name, want in results[0].items():
        assert torch.allclose(results[1][name], want, rtol=1e-5, atol=1e-7), name


def test_peft_wrapped_models_train_their_adapters():
    peft = pytest.importorskip("peft")
    strong = tiny_causal_lm("llama", vocab_size=VOCAB, seed=1)
    weak = tiny_causal_lm("llama", vocab_size=VOCAB, seed=2)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(strong, config)
    input_ids, attention_mask, labels = batch()
    expected = unfused_loss(lora, weak, input_ids, attention_mask, labels, 0.5)
    pair = wmss.apply_wmss(lora, weak, train_weak=False)
    out = pair(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert math.isclose(out.loss.item(), expected.item(), rel_tol=1e-5)
    out.loss.backward()
    adapters = [p for n, p in lora.named_parameters() if "lora_" in n]
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora_" not in n)


# Tiny mixture-of-experts models: 4 experts, 2 per token, every layer sparse.
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1, mlp_only_layers=[]),
}


def tiny_moe(model_type, seed, **overrides):
    return tiny_causal_lm(model_type, vocab_size=VOCAB, hidden_size=32, seed=seed,
                          router_aux_loss_coef=0.5, **MOE[model_type], **overrides)


@pytest.mark.parametrize("model_type", list(MOE))
def test_moe_router_loss_is_added_as_the_model_itself_adds_it(model_type):
    """lam=1, weak model frozen: the pair's loss is the strong model's own loss, router
    load-balancing term included, whether the config or the call asks for router logits."""
    input_ids, attention_mask, labels = batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    by_config = tiny_moe(model_type, seed=1, output_router_logits=True)
    pair = wmss.apply_wmss(by_config, tiny_moe(model_type, seed=2), lam=1.0, train_weak=False)
    own = by_config(**inputs, output_router_logits=True)
    out = pair(**inputs)
    assert own.aux_loss > 0 and math.isclose(out.loss.item(), own.loss.item(), rel_tol=1e-6)
    assert math.isclose(out.aux_loss.item(), 0.5 * own.aux_loss.item(), rel_tol=1e-6)

    plain = tiny_moe(model_type, seed=1)  # config.output_router_logits=False
    pair = wmss.apply_wmss(plain, tiny_moe(model_type, seed=2), lam=1.0, train_weak=False)
    asked = pair(**inputs, output_router_logits=True)
    assert math.isclose(asked.loss.item(), own.loss.item(), rel_tol=1e-6)
    not_asked = pair(**inputs)
    assert not_asked.aux_loss is None
    assert math.isclose(not_asked.loss.item(), plain(**inputs).loss.item(), rel_tol=1e-6)


def test_moe_router_losses_of_both_trained_models_and_their_share_of_an_accumulated_batch():
    """Both models trained: both router terms. With num_items_in_batch, each micro-batch's
    router term counts by its share of the supervised tokens, so over the accumulated batch the
    term is the token-weighted mean (not one full term per micro-batch)."""
    strong = tiny_moe("mixtral", seed=1, output_router_logits=True)
    weak = tiny_moe("mixtral", seed=2, output_router_logits=True)
    pair = wmss.apply_wmss(strong, weak, lam=0.3)
    input_ids, attention_mask, labels = batch()
    parts = [(input_ids[:1], attention_mask[:1], labels[:1]),
             (input_ids[1:], attention_mask[1:], labels[1:])]
    counts = [int((lab[:, 1:] != -100).sum()) for _, _, lab in parts]
    total = sum(counts)
    accumulated, weighted_aux, plain_sum = 0.0, 0.0, 0.0
    for (ids, mask, lab), count in zip(parts, counts):
        own = [m(input_ids=ids, attention_mask=mask, labels=lab, output_router_logits=True)
               for m in (strong, weak)]
        aux = 0.5 * (own[0].aux_loss + own[1].aux_loss).item()
        out = pair(input_ids=ids, attention_mask=mask, labels=lab, num_items_in_batch=total)
        assert math.isclose(out.aux_loss.item(), aux, rel_tol=1e-6)
        plain = pair(input_ids=ids, attention_mask=mask, labels=lab, num_items_in_batch=total,
                     output_router_logits=False)
        accumulated += out.loss.item()
        plain_sum += plain.loss.item()
        weighted_aux += aux * count / total
    assert math.isclose(accumulated, plain_sum + weighted_aux, rel_tol=1e-6)


def test_router_logits_asked_of_dense_models_are_refused():
    strong = tiny_causal_lm("llama", vocab_size=VOCAB, seed=1)
    pair = wmss.apply_wmss(strong, tiny_causal_lm("llama", vocab_size=VOCAB, seed=2))
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="output_router_logits=True.*mixture-of-experts"):
        pair(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
             output_router_logits=True)


def load_balancing_loss_func(gate_logits, num_experts, num_keys, top_k, attention_mask):
    """A load-balancing loss of another signature (as Doge's), for the test below."""
    raise AssertionError("never called")


def test_a_router_loss_wmss_cannot_call_is_refused_when_the_config_asks_for_it():
    from transformers import MixtralForCausalLM

    class OtherRouterLoss(MixtralForCausalLM):  # its module (this one) has the function above
        pass

    config = tiny_moe("mixtral", seed=1, output_router_logits=True).config
    # The built model chose its experts implementation (grouped_mm), which transformers 5.0 to
    # 5.13 cannot give a model class defined outside transformers: let the new class choose its own.
    config._experts_implementation = None
    with pytest.raises(ValueError, match="strong model: OtherRouterLoss.*output_router_logits"):
        wmss.apply_wmss(OtherRouterLoss(config), tiny_moe("mixtral", seed=2))
