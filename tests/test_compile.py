"""``torch.compile(..., fullgraph=True)`` of the fused loss and of a pair: one graph, no break, and
the same loss, statistics and gradients as eager (the fused engines run as custom ops)."""

import pytest
import torch
from conftest import TRITON_AVAILABLE, assert_close, make_inputs

import wmss
from wmss.loss.inputs import COMPILED_CHECK_MESSAGE
from wmss.recipe.toy import tiny_causal_lm

# "auto" is the native engine on a CPU where it builds (else torch).
COMPILED_BACKENDS = ["torch", "auto", pytest.param("triton", marks=[pytest.mark.slow, pytest.mark.skipif(
    not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")])]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_and_grads(fn, inputs, labels, **options):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    loss, stats = fn(leaves, labels, **options)
    loss.backward()
    return loss, stats, {k: v.grad for k, v in leaves.items()}


def fused(leaves, labels, **options):
    return wmss.fused_loss(**leaves, labels=labels, return_stats=True, **options)


@pytest.mark.parametrize("train_weak", [True, False])
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_the_compiled_fused_loss_equals_eager(backend, train_weak):
    inputs, labels = make_inputs(shape=(3, 7), vocab=90, d_strong=24, d_weak=16, bias=True)
    options = dict(lam=0.3, softcap=12.0, gap_threshold=0.0, backend=backend,
                   num_items_in_batch=torch.tensor(17.0), train_weak=train_weak)
    compiled = torch.compile(fused, fullgraph=True)
    want_loss, want_stats, want_grads = loss_and_grads(fused, inputs, labels, **options)
    loss, stats, grads = loss_and_grads(compiled, inputs, labels, **options)
    assert_close(loss, want_loss, 1e-6, "loss")
    for field in ("entropy_strong", "entropy_weak", "logprob_mix"):
        assert_close(getattr(stats, field), getattr(want_stats, field), 1e-6, field)
    assert torch.equal(stats.mixed, want_stats.mixed)
    for name, grad in want_grads.items():
        if grad is None:  # a frozen weak model
            assert grads[name] is None, name
        else:
            assert_close(grads[name], grad, 1e-6, name)
    assert (want_grads["weak_weight"] is None) == (not train_weak)


def test_a_compiled_loss_still_refuses_out_of_range_labels():
    inputs, labels = make_inputs(shape=(2, 5), vocab=40, d_strong=16, d_weak=12)
    compiled = torch.compile(fused, fullgraph=True)
    compiled(inputs, labels, backend="torch")  # compiled on good labels
    labels = labels.clone()
    labels[0, 1] = 40
    with pytest.raises(RuntimeError, match="labels must lie in \\[0, V\\)"):
        compiled(inputs, labels, backend="torch")
    assert "labels must lie" in COMPILED_CHECK_MESSAGE


def test_a_compiled_pair_trains_as_the_eager_one():
    strong = tiny_causal_lm("llama", vocab_size=61, hidden_size=32, seed=1)
    weak = tiny_causal_lm("llama", vocab_size=61, hidden_size=32, seed=2)
    pair = wmss.apply_wmss(strong, weak, lam=0.3, gap_threshold=0.0, backend="torch")
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 61, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)

    def step(model):
        pair.zero_grad()
        out = model(**batch)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in pair.named_parameters()}

    eager, want = step(pair)
    compiled, got = step(torch.compile(pair, fullgraph=True))
    assert_close(compiled.loss, eager.loss, 1e-6, "loss")
    assert_close(compiled.entropy_weak, eager.entropy_weak, 1e-6, "weak entropy")
    for name, grad in want.items():
        assert_close(got[name], grad, 1e-5, name)


@pytest.mark.slow
def test_the_trainer_with_torch_compile_takes_the_eager_step(tmp_path):
    """``TrainingArguments(torch_compile=True)``: Trainer compiles the pair; one SGD step lands on
    the weights the eager step gives."""
    from trainer_fixtures import examples, make_pair, snapshot

    from wmss.hf.batches import Collator

    def trained(compile_: bool):
        torch._dynamo.reset()
        pair = make_pair(backend="torch")
        args = wmss.training_arguments(
            str(tmp_path / f"run-{compile_}"), per_device_train_batch_size=4, max_steps=1,
            learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
            weight_decay=0.0, use_cpu=True, save_strategy="no", report_to=[], disable_tqdm=True,
            torch_compile=compile_, seed=0)
        wmss.WMSSTrainer(pair, args, train_dataset=examples(), data_collator=Collator(0)).train()
        return snapshot(pair)

    eager, compiled = trained(False), trained(True)
    assert eager.keys() == compiled.keys()
    for name, weight in eager.items():
        assert_close(compiled[name], weight, 1e-6, name)


def test_a_compiled_loss_takes_a_transposed_weight():
    """The backward's fake outputs are contiguous, as its real gradients are, whatever the
    inputs' strides: here the strong weight is held as ``[d, V]`` and passed transposed."""
    inputs, labels = make_inputs(shape=(2, 5), vocab=37, d_strong=8, d_weak=6)
    inputs["strong_weight"] = inputs["strong_weight"].detach().t().contiguous()  # [d, V]

    def transposed(leaves, labels, **options):
        return fused({**leaves, "strong_weight": leaves["strong_weight"].t()}, labels, **options)

    want_loss, _, want_grads = loss_and_grads(transposed, inputs, labels, backend="torch")
    loss, _, grads = loss_and_grads(torch.compile(transposed, fullgraph=True), inputs, labels,
                                    backend="torch")
    assert_close(loss, want_loss, 1e-6, "loss")
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, 1e-6, name)
