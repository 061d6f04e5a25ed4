"""WD-DS (wmss.selection, wmss select): weights, draws, per-example scores, resume, the command."""

import dataclasses
import json
import math
import os

import pytest
import torch
from conftest import BACKENDS, assert_close

import wmss.commands
from wmss.hf import batches
from wmss.recipe import data, selection, toy
from wmss.recipe.selection import scoring, signatures
from wmss.io import atomic_write_json, atomic_write_text

# Crafted per-example entropies: dH = strong - weak = [-0.5, +1.0, 0, 0].
H_STRONG = [1.0, 2.0, 0.5, 0.0]
H_WEAK = [1.5, 1.0, 0.5, 0.0]


# --------------------------------------------------------------------------------------------
# sampling_weights
# --------------------------------------------------------------------------------------------

def test_paper_weights_follow_eq_9_on_crafted_entropies():
    # alpha*[-dH]_+ + beta*H_strong + gamma*[dH]_+ with (0.1, 0.8, 0.1):
    #   0.1*0.5 + 0.8*1.0 = 0.85;  0.8*2.0 + 0.1*1.0 = 1.7;  0.8*0.5 = 0.4;  0.
    raw = [0.85, 1.7, 0.4, 0.0]
    weights = selection.sampling_weights(H_STRONG, H_WEAK)  # defaults: the paper's
    assert weights.dtype == torch.float64 and weights.shape == (4,)
    assert torch.allclose(weights, torch.tensor(raw, dtype=torch.float64) / sum(raw), rtol=1e-12)
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("coefficients, expected", [
    (dict(alpha=1.0, beta=0.0, gamma=0.0), [1.0, 0.0, 0.0, 0.0]),   # only [-dH]_+: example 0
    (dict(alpha=0.0, beta=0.0, gamma=2.0), [0.0, 1.0, 0.0, 0.0]),   # only [dH]_+: example 1
    (dict(alpha=0.0, beta=1.0, gamma=0.0), [1 / 3.5, 2 / 3.5, 0.5 / 3.5, 0.0]),  # H_strong
])
def test_each_term_of_eq_9_selects_what_it_should(coefficients, expected):
    weights = selection.sampling_weights(torch.tensor(H_STRONG), torch.tensor(H_WEAK),
                                         **coefficients)
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


def test_per_term_normalises_each_term_before_weighting():
    # [-dH]_+ = [.5,0,0,0] -> [1,0,0,0]; H = [1,2,.5,0] -> [2,4,1,0]/7; [dH]_+ -> [0,1,0,0].
    expected = [0.1 + 0.8 * 2 / 7, 0.8 * 4 / 7 + 0.1, 0.8 * 1 / 7, 0.0]  # sums to 1 already
    weights = selection.sampling_weights(H_STRONG, H_WEAK, normalize="per_term")
    assert weights.dtype == torch.float64
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    # The paper's formula differs on the same input.
    assert not torch.allclose(weights, selection.sampling_weights(H_STRONG, H_WEAK))


def test_per_term_leaves_an_all_zero_term_at_zero():
    # dH = 0 everywhere: both discrepancy terms vanish (no 0/0), only the H term is left.
    h = [0.5, 1.5, 2.0]
    weights = selection.sampling_weights(h, h, normalize="per_term")
    assert torch.allclose(weights, torch.tensor(h, dtype=torch.float64) / 4.0, rtol=1e-12)


def test_entropy_term_weak_uses_the_base_model_entropy():
    weights = selection.sampling_weights(H_STRONG, H_WEAK, alpha=0.0, beta=1.0, gamma=0.0,
                                         entropy_term="weak")
    assert torch.allclose(weights, torch.tensor(H_WEAK, dtype=torch.float64) / 3.0, rtol=1e-12)


def test_documented_mapping_reproduces_the_authors_formula():
    """Their (a, b, c): a * H_base / sum + b * [-dH]_+ / sum + c * [dH]_+ / sum, normalised."""
    strong, weak = torch.rand(50, dtype=torch.float64) * 3, torch.rand(50, dtype=torch.float64) * 3
    a, b, c = 0.3, 0.5, 0.2
    dh = strong - weak
    theirs = (a * weak / weak.sum() + b * (-dh).clamp(min=0) / (-dh).clamp(min=0).sum()
              + c * dh.clamp(min=0) / dh.clamp(min=0).sum())
    ours = selection.sampling_weights(strong, weak, alpha=b, beta=a, gamma=c,
                                      normalize="per_term", entropy_term="weak")
    assert torch.allclose(ours, theirs / theirs.sum(), rtol=1e-12)


def test_weight_terms_add_up_to_the_weights():
    strong, weak = torch.rand(20) * 2, torch.rand(20) * 2
    for normalize in selection.NORMALIZATIONS:
        terms = selection.weight_terms(strong, weak, alpha=0.2, beta=0.5, gamma=0.3,
                                       normalize=normalize)
        assert set(terms) == {"alpha", "beta", "gamma"}
        total = terms["alpha"] + terms["beta"] + terms["gamma"]
        weights = selection.sampling_weights(strong, weak, alpha=0.2, beta=0.5, gamma=0.3,
                                             normalize=normalize)
        assert torch.allclose(weights, total / total.sum(), rtol=1e-12)
        assert all(bool((term >= 0).all()) for term in terms.values())


@pytest.mark.parametrize("strong, weak, options, match", [
    ([1.0, float("nan")], [1.0, 1.0], {}, r"entropy_strong must be finite.*entropy_strong\[1\]"),
    ([1.0, 1.0], [float("inf"), 1.0], {}, r"entropy_weak must be finite"),
    ([1.0, -0.5], [1.0, 1.0], {}, r"entropy_strong must be >= 0.*entropy_strong\[1\] is -0.5"),
    ([1.0, 1.0], [1.0, 1.0, 1.0], {}, r"same shape"),
    ([[1.0, 1.0]], [[1.0, 1.0]], {}, r"entropy_strong must be 1-D"),
    ([1.0], [1.0], dict(alpha=-0.1), r"alpha must be a finite number >= 0"),
    ([1.0], [1.0], dict(gamma=float("nan")), r"gamma must be a finite number >= 0"),
    ([1.0], [1.0], dict(alpha=0, beta=0, gamma=0), r"all 0"),
    ([1.0], [1.0], dict(normalize="softmax"), r"normalize must be one of"),
    ([1.0], [1.0], dict(entropy_term="mixed"), r"entropy_term must be one of"),
])
def test_sampling_weights_reject_bad_input_naming_the_argument(strong, weak, options, match):
    with pytest.raises(ValueError, match=match):
        selection.sampling_weights(strong, weak, **options)


def test_sampling_weights_type_errors():
    with pytest.raises(TypeError, match="beta must be a real number"):
        selection.sampling_weights([1.0], [1.0], beta="0.8")
    with pytest.raises(TypeError, match="entropy_weak must be a 1-D tensor or sequence"):
        selection.sampling_weights([1.0], "high")


def test_all_zero_weights_cannot_be_drawn():
    weights = selection.sampling_weights([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert weights.tolist() == [0.0, 0.0, 0.0]  # no NaN from 0 / 0
    with pytest.raises(ValueError, match="every example has weight 0"):
        selection.draw_active(weights)


# --------------------------------------------------------------------------------------------
# draw_active
# --------------------------------------------------------------------------------------------

def test_draw_active_returns_sorted_unique_int64_indices_in_range():
    weights = torch.rand(300, dtype=torch.float64)
    weights[::7] = 0.0
    active = selection.draw_active(weights, seed=3)
    assert active.dtype == torch.int64 and active.dim() == 1
    assert torch.equal(active, torch.unique(active))  # sorted, no duplicates
    assert 0 <= int(active.min()) and int(active.max()) < 300
    assert not bool((weights[active] == 0).any()), "an example of weight 0 was drawn"
    # |D| = 300 draws with replacement leave out ~1/e of a uniform-ish set: far fewer than 300.
    assert 100 < active.numel() < 280


def test_draw_active_is_reproducible_and_depends_on_the_seed():
    weights = selection.sampling_weights(torch.rand(100) * 2, torch.rand(100) * 2)
    first = selection.draw_active(weights, seed=11)
    assert torch.equal(first, selection.draw_active(weights.clone(), seed=11))
    assert torch.equal(first, selection.draw_active(weights.tolist(), seed=11))
    assert not torch.equal(first, selection.draw_active(weights, seed=12))


def test_draw_active_counts_and_degenerate_weights():
    assert selection.draw_active([0.0, 5.0, 0.0], seed=0).tolist() == [1]
    assert selection.draw_active([1.0, 1.0], num_draws=0).numel() == 0
    # Unnormalised weights are fine: probabilities are weights / sum.
    weights = torch.rand(40, dtype=torch.float64)
    assert torch.equal(selection.draw_active(weights, 25, seed=5),
                       selection.draw_active(weights * 8.0, 25, seed=5))
    # One draw picks one example; many draws over two equal weights pick both.
    assert selection.draw_active([1.0, 1.0, 1.0], num_draws=1).numel() == 1
    assert selection.draw_active([1.0, 1.0], num_draws=200).tolist() == [0, 1]


def test_inclusion_rate_matches_one_minus_one_minus_p_to_the_d():
    """Example i is in the active set with probability 1 - (1 - p_i)^D (D draws)."""
    n = draws = 200
    repeats = 400
    weights = torch.linspace(0.0, 1.0, n, dtype=torch.float64) ** 3  # from 0 to ~50x the mean
    weights[:5] = 0.0
    p = weights / weights.sum()
    expected = 1 - (1 - p) ** draws
    counts = torch.zeros(n, dtype=torch.float64)
    sizes = []
    for seed in range(repeats):
        active = selection.draw_active(weights, seed=seed)
        counts[active] += 1
        sizes.append(active.numel())
    rate = counts / repeats
    # Binomial standard error per example; 5 sigma (+ one count) keeps 200 checks unflaky.
    stderr = (expected * (1 - expected) / repeats).sqrt()
    worst = ((rate - expected).abs() - 5 * stderr - 1 / repeats).max()
    assert worst <= 0, f"inclusion rate off by {worst:.3f} beyond 5 standard errors"
    assert rate[:5].max() == 0
    # The mean active-set size matches sum(expected) (its variance is at most sum q(1-q)).
    sizes = torch.tensor(sizes, dtype=torch.float64)
    bound = 5 * float((expected * (1 - expected)).sum().sqrt()) / math.sqrt(repeats)
    assert abs(float(sizes.mean()) - float(expected.sum())) < bound


@pytest.mark.parametrize("weights, options, error, match", [
    ([[1.0, 2.0]], {}, ValueError, "weights must be 1-D"),
    ([1.0, float("nan")], {}, ValueError, r"weights must be finite.*weights\[1\]"),
    ([1.0, -1.0], {}, ValueError, r"weights must be >= 0"),
    ([], {}, ValueError, "every example has weight 0"),
    ([1.0], dict(num_draws=-1), ValueError, "num_draws must be >= 0"),
    ([1.0], dict(num_draws=2.5), TypeError, "num_draws must be an int"),
    ([1.0], dict(seed=-3), ValueError, "seed must be >= 0"),
    ([1.0], dict(seed=True), TypeError, "seed must be an int"),
    ([1.0], dict(seed=2 ** 63), ValueError, r"seed must be < 2\*\*63"),
    ([1.0], dict(num_draws=2 ** 63), ValueError, r"num_draws must be < 2\*\*63"),
    ([1.0], dict(keep_duplicates=1), TypeError, "keep_duplicates must be True or False"),
    ([1.0], dict(num_draws=2 ** 31 + 1, keep_duplicates=True), ValueError,
     r"num_draws=2147483649 is too many to keep every draw.*2\*\*31"),
])
def test_draw_active_rejects_bad_input(weights, options, error, match):
    with pytest.raises(error, match=match):
        selection.draw_active(weights, **options)


def test_draw_active_draws_len_weights_times_by_default():
    """num_draws=None is the paper's |D|: as many draws as examples."""
    weights = torch.rand(60, dtype=torch.float64)
    for seed in range(3):
        assert torch.equal(selection.draw_active(weights, seed=seed),
                           selection.draw_active(weights, 60, seed=seed))
        assert selection.draw_active(weights, seed=seed, keep_duplicates=True).numel() == 60
    assert not torch.equal(selection.draw_active(weights, seed=0, keep_duplicates=True),
                           selection.draw_active(weights, 59, seed=0, keep_duplicates=True))


def test_huge_numbers_of_draws_select_every_positive_weight_and_no_zero_weight():
    # Expected draws of the smallest weight: 1e13 * 1e-9 / 5 = 2000, so it is drawn for sure.
    weights = [3.0, 0.0, 1e-6, 0.0, 2.0, 1e-9, 0.0]
    assert selection.draw_active(weights, 10 ** 13, seed=4).tolist() == [0, 2, 4, 5]
    # The rounding of 1/3 + 1/3 + 1/3 leaves ~1e-16 of the mass over: at 10**17 draws, a
    # multinomial over all four weights hands it to the last one, of weight 0.
    for seed in range(3):
        assert selection.draw_active([1.0, 1.0, 1.0, 0.0], 10 ** 17, seed=seed).tolist() == \
            [0, 1, 2]


def test_weights_whose_sum_overflows_draw_like_the_same_weights_scaled_down():
    shape = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    huge = shape * 2.0 ** 1023  # exact scaling; their sum, 3.5 * 2**1023, overflows float64
    assert math.isinf(float(huge.sum()))
    for seed in range(5):
        assert torch.equal(selection.draw_active(huge, 3, seed=seed),
                           selection.draw_active(shape, 3, seed=seed))
    # ... and follow the weights: 2/7, 2/7, 2/7, 0, 1/7 of 70 000 draws.
    every = selection.draw_active(huge, 70_000, seed=1, keep_duplicates=True)
    counts = torch.bincount(every, minlength=5).double()
    expected = torch.tensor([20_000, 20_000, 20_000, 0, 10_000], dtype=torch.float64)
    assert counts[3] == 0
    assert bool(((counts - expected).abs() <= 5 * (expected * (1 - expected / 70_000)).sqrt()
                 ).all()), counts.tolist()


def test_keep_duplicates_returns_every_draw_sorted_with_repeats():
    weights = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    every = selection.draw_active(weights, 60_000, seed=7, keep_duplicates=True)
    assert every.dtype == torch.int64 and every.numel() == 60_000
    assert torch.equal(every, every.sort().values)
    # The same draws as without keep_duplicates, repeats aside.
    assert torch.equal(torch.unique(every), selection.draw_active(weights, 60_000, seed=7))
    # An example drawn k times appears k times: counts follow p = [1, 2, 3, 0] / 6.
    counts = torch.bincount(every, minlength=4).double()
    expected = torch.tensor([10_000, 20_000, 30_000, 0], dtype=torch.float64)
    assert counts[3] == 0
    assert bool(((counts - expected).abs() <= 5 * (expected * (1 - expected / 60_000)).sqrt()
                 ).all()), counts.tolist()
    # Few draws on many examples: repeats are kept, so the length is always num_draws.
    assert selection.draw_active([0.0, 1.0], 5, keep_duplicates=True).tolist() == [1] * 5


# --------------------------------------------------------------------------------------------
# score_dataset on a tiny model pair
# --------------------------------------------------------------------------------------------

RECORDS = [  # deliberately not sorted by length; one chat record
    {"prompt": "12+30=", "completion": "42"},
    {"prompt": "What is 7*6? ", "completion": "It is 42, of course."},
    {"prompt": "1+2=", "completion": "3"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]},
    {"text": "a b c d e f"},
    {"prompt": "Say nothing:", "completion": ""},
    {"prompt": "9-4=", "completion": "5"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return toy.char_tokenizer()


def _pair(tokenizer):
    # initializer_range 0.5: peaked, varied distributions (the default gives entropies ~log V).
    strong = toy.tiny_causal_lm(vocab_size=len(tokenizer), seed=1, initializer_range=0.5)
    weak = toy.tiny_causal_lm(vocab_size=len(tokenizer), seed=2, initializer_range=0.5)
    return strong, weak


@pytest.fixture(scope="module")
def pair(tokenizer):
    return _pair(tokenizer)


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return data.encode_records(RECORDS, tokenizer)


def reference_scores(model, dataset):
    """Per example, float64 mean entropy of the HF logits over the supervised targets."""
    entropies = []
    with torch.no_grad():
        for example in dataset:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            log_p = logits.double().log_softmax(-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            supervised = torch.tensor(example["labels"][1:]) != -100
            entropies.append(float(entropy[supervised].mean()) if supervised.any() else 0.0)
    return torch.tensor(entropies, dtype=torch.float64)


class ForwardCounter:
    """Counts the examples each model's backbone runs on; can fail on the k-th forward pass."""

    def __init__(self, models: dict, fail_at=None, on_fail=None):
        self.examples = {name: 0 for name in models}
        self.calls, self.fail_at, self.on_fail = 0, fail_at, on_fail
        self.handles = [model.base_model.register_forward_pre_hook(self._hook(name),
                                                                   with_kwargs=True)
                        for name, model in models.items()]

    def _hook(self, name):
        def hook(module, args, kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                if self.on_fail:
                    self.on_fail()
                raise KeyboardInterrupt("simulated interruption")
            self.examples[name] += kwargs["input_ids"].shape[0]
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_match_float64_entropies_of_the_hf_logits(pair, dataset, backend):
    strong, weak = pair
    scores = selection.score_dataset(strong, weak, dataset, batch_size=3, progress=False,
                                     backend=backend)
    assert scores.entropy_strong.dtype == scores.entropy_weak.dtype == torch.float64
    assert scores.tokens.dtype == torch.int64
    assert scores.tokens.tolist() == [batches.supervised_tokens(e) for e in dataset]
    assert_close(scores.entropy_strong, reference_scores(strong, dataset), 1e-5, "strong")
    assert_close(scores.entropy_weak, reference_scores(weak, dataset), 1e-5, "weak")
    assert (scores.entropy_strong - scores.entropy_weak).abs().max() > 0.05  # two models


def test_padding_and_batching_do_not_change_the_scores(pair, dataset):
    strong, weak = pair
    one = selection.score_dataset(strong, weak, dataset, batch_size=1, progress=False)
    for batch_size in (3, 16):
        batched = selection.score_dataset(strong, weak, dataset, batch_size=batch_size,
                                          progress=False, pad_token_id=5)
        assert_close(batched.entropy_strong, one.entropy_strong, 1e-6, f"batch {batch_size}")
        assert_close(batched.entropy_weak, one.entropy_weak, 1e-6, f"batch {batch_size}")
        assert torch.equal(batched.tokens, one.tokens)


def test_a_custom_ignore_index_gives_the_same_scores(pair, dataset):
    strong, weak = pair
    relabelled = [{"input_ids": e["input_ids"], "labels": [-1 if y == -100 else y
                                                            for y in e["labels"]]}
                  for e in dataset]
    default = selection.score_dataset(strong, weak, dataset, batch_size=3, progress=False)
    custom = selection.score_dataset(strong, weak, relabelled, batch_size=3, progress=False,
                                     ignore_index=-1)
    assert torch.equal(custom.tokens, default.tokens)
    assert_close(custom.entropy_strong, default.entropy_strong, 1e-12)


def test_examples_without_supervised_tokens_score_zero_and_are_never_drawn(pair, dataset):
    strong, weak = pair
    unsupervised = [
        {"input_ids": [1, 20, 21, 22], "labels": [-100] * 4},  # prompt only
        {"input_ids": [1], "labels": [1]},                      # nothing left after the shift
        {"input_ids": [], "labels": []},
    ]
    counter = ForwardCounter({"strong": strong, "weak": weak})
    try:
        alone = selection.score_dataset(strong, weak, unsupervised, progress=False)
    finally:
        counter.remove()
    assert counter.examples == {"strong": 0, "weak": 0}  # nothing to score: no forward pass
    assert alone.tokens.tolist() == [0, 0, 0]
    assert alone.entropy_strong.tolist() == alone.entropy_weak.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="every example has weight 0"):
        selection.draw_active(selection.sampling_weights(alone.entropy_strong,
                                                         alone.entropy_weak))

    mixed = selection.score_dataset(strong, weak, unsupervised + list(dataset[:3]),
                                    progress=False)
    weights = selection.sampling_weights(mixed.entropy_strong, mixed.entropy_weak)
    assert weights[:3].tolist() == [0.0, 0.0, 0.0] and bool((weights[3:] > 0).all())
    assert int(selection.draw_active(weights, 1000).min()) >= 3


def test_models_run_in_eval_mode_and_get_their_mode_back(pair, dataset):
    strong, weak = pair
    strong.train()
    weak.eval()
    seen = []
    handle = strong.base_model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try:
        selection.score_dataset(strong, weak, dataset[:2], progress=False)
    finally:
        handle.remove()
        was_training = strong.training
        strong.eval()
    assert seen and not any(seen) and was_training and not weak.training


def test_score_dataset_validates_its_input(pair, dataset, tmp_path):
    strong, weak = pair
    with pytest.raises(ValueError, match=r"dataset\[1\]: 'input_ids' and 'labels' must have"):
        selection.score_dataset(strong, weak, [dataset[0], {"input_ids": [1, 2], "labels": [1]}],
                                progress=False)
    with pytest.raises(ValueError, match=r"dataset\[0\] must be a dict"):
        selection.score_dataset(strong, weak, [[1, 2, 3]], progress=False)
    with pytest.raises(ValueError, match="strong_model has .* input embeddings"):
        selection.score_dataset(strong, weak, [{"input_ids": [1, 10_000], "labels": [1, 2]}],
                                progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        selection.score_dataset(strong, weak, dataset, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        selection.score_dataset(strong, weak, dataset, backend="cuda", progress=False)
    with pytest.raises(TypeError, match="weak_model must be a torch.nn.Module"):
        selection.score_dataset(strong, "gpt2", dataset, progress=False)


def test_non_finite_entropies_are_a_clear_error(tokenizer, dataset):
    strong, weak = _pair(tokenizer)
    with torch.no_grad():
        weak.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"weak_model gives non-finite entropies on dataset "
                                         r"examples \[\d"):
        selection.score_dataset(strong, weak, dataset, progress=False)


# --------------------------------------------------------------------------------------------
# The scores file: resume, atomic writes, refusing to clobber
# --------------------------------------------------------------------------------------------

def test_scoring_resumes_after_an_interruption_without_recomputing(pair, dataset, tmp_path):
    strong, weak = pair
    models = {"strong": strong, "weak": weak}
    output = tmp_path / "scores.json"
    reference = selection.score_dataset(strong, weak, dataset, batch_size=2, progress=False)
    scorable = int((reference.tokens > 0).sum())  # 7 records, all supervised: 4 batches of 2

    seen_mid_run = {}

    def read_checkpoint():  # what a crash at this point would leave behind
        seen_mid_run.update(json.loads(output.read_text()))

    # Forward passes alternate strong/weak per batch: call 5 is batch 3's strong pass.
    counter = ForwardCounter(models, fail_at=5, on_fail=read_checkpoint)
    try:
        with pytest.raises(KeyboardInterrupt):
            selection.score_dataset(strong, weak, dataset, batch_size=2, progress=False,
                                    output=output, save_interval=0)
    finally:
        counter.remove()
    # Checkpointed after each of the two finished batches, before the interruption.
    assert seen_mid_run["complete"] is False
    assert sum(t is not None for t in seen_mid_run["tokens"]) == 4
    partial = json.loads(output.read_text())
    assert partial["complete"] is False and sum(t is not None for t in partial["tokens"]) == 4
    with pytest.raises(ValueError, match="scoring was interrupted"):
        selection.DatasetScores.load(output)

    counter = ForwardCounter(models)
    try:
        resumed = selection.score_dataset(strong, weak, dataset, batch_size=2, progress=False,
                                          output=output, save_interval=0)
    finally:
        counter.remove()
    assert counter.examples == {"strong": scorable - 4, "weak": scorable - 4}
    for field in ("entropy_strong", "entropy_weak", "tokens"):
        assert torch.equal(getattr(resumed, field), getattr(reference, field)), field
    loaded = selection.DatasetScores.load(output)
    assert torch.equal(loaded.entropy_strong, reference.entropy_strong)
    assert torch.equal(loaded.tokens, reference.tokens)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))

    # A complete file is reused as it is: no forward pass at all.
    counter = ForwardCounter(models)
    try:
        again = selection.score_dataset(strong, weak, dataset, output=output, progress=False)
    finally:
        counter.remove()
    assert counter.examples == {"strong": 0, "weak": 0}
    assert torch.equal(again.entropy_weak, reference.entropy_weak)


def test_an_output_that_belongs_to_something_else_is_never_overwritten_silently(
        pair, dataset, tokenizer, tmp_path):
    strong, weak = pair
    output = tmp_path / "scores.json"
    selection.score_dataset(strong, weak, dataset[:4], output=output, progress=False)
    saved = output.read_text()

    with pytest.raises(ValueError, match="does not hold these scores.*4 examples.*overwrite=True"):
        selection.score_dataset(strong, weak, dataset[:3], output=output, progress=False)
    changed = [dict(e) for e in dataset[:4]]
    changed[2] = {"input_ids": changed[2]["input_ids"],
                  "labels": [-100] * len(changed[2]["labels"])}
    with pytest.raises(ValueError, match="different data set"):
        selection.score_dataset(strong, weak, changed, output=output, progress=False)
    other = toy.tiny_causal_lm(vocab_size=len(tokenizer), seed=3, initializer_range=0.5)
    with pytest.raises(ValueError, match="different models"):
        selection.score_dataset(strong, other, dataset[:4], output=output, progress=False)
    assert output.read_text() == saved

    not_scores = tmp_path / "notes.json"
    not_scores.write_text("my notes\n")
    with pytest.raises(ValueError, match="not a wmss scores file"):
        selection.score_dataset(strong, weak, dataset[:4], output=not_scores, progress=False)
    assert not_scores.read_text() == "my notes\n"

    replaced = selection.score_dataset(strong, other, dataset[:4], output=output, progress=False,
                                       overwrite=True)
    assert torch.equal(selection.DatasetScores.load(output).entropy_weak, replaced.entropy_weak)


def test_scores_are_not_reused_when_a_weight_the_old_sampled_probe_skipped_changed(
        tokenizer, dataset, tmp_path):
    strong, weak = _pair(tokenizer)
    output = tmp_path / "scores.json"
    before = selection.score_dataset(strong, weak, dataset, output=output, progress=False)
    saved = output.read_text()
    # Format 1 summed 64 evenly spaced values of each parameter: of lm_head.weight, [V, 64], the
    # flat index 1 was never among them. One value changed there changes the scores.
    head = weak.lm_head.weight
    assert head.numel() // 64 > 1
    with torch.no_grad():
        head.view(-1)[1] += 3.0
    changed = reference_scores(weak, dataset)
    assert float((changed - before.entropy_weak).abs().max()) > 1e-3  # stale scores are wrong

    with pytest.raises(ValueError, match=r"different models \(the weak model's .*weights differ"
                                         r"\).*overwrite=True"):
        selection.score_dataset(strong, weak, dataset, output=output, progress=False)
    assert output.read_text() == saved
    rescored = selection.score_dataset(strong, weak, dataset, output=output, progress=False,
                                       overwrite=True)
    assert_close(rescored.entropy_weak, changed, 1e-5, "weak, rescored")
    assert_close(rescored.entropy_strong, before.entropy_strong, 1e-12, "strong, rescored")
    assert torch.equal(selection.DatasetScores.load(output).entropy_weak, rescored.entropy_weak)


def test_model_signature_is_an_exact_hash_of_every_parameter_and_buffer(tokenizer, monkeypatch):
    def signature(model):
        return signatures._model_signature(model)

    model = toy.tiny_causal_lm(vocab_size=len(tokenizer), seed=1)
    base = signature(model)
    assert base["tensors_without_data"] == 0 and len(base["sha256"]) == 64
    assert signature(toy.tiny_causal_lm(vocab_size=len(tokenizer), seed=1)) == base
    # Hashed in chunks: the chunk size does not change the hash (40 bytes: 10 float32 values).
    monkeypatch.setattr(signatures, "HASH_CHUNK_BYTES", 40)
    assert signature(model) == base
    monkeypatch.undo()

    def changed_by_one_ulp(tensor):
        with torch.no_grad():
            flat = tensor.view(-1)
            flat[-1] = torch.nextafter(flat[-1], flat[-1] + 1)
        assert signature(model) != base
        with torch.no_grad():
            flat[-1] = torch.nextafter(flat[-1], flat[-1] - 1)
        assert signature(model) == base

    changed_by_one_ulp(model.model.norm.weight)
    buffers = dict(model.named_buffers())
    assert buffers, "the tiny llama has rotary frequencies as a (non-persistent) buffer"
    changed_by_one_ulp(next(iter(buffers.values())))

    # bfloat16 (which numpy lacks) is hashed from its bytes, and one value of it counts too.
    half = toy.tiny_causal_lm(vocab_size=len(tokenizer), seed=1).to(torch.bfloat16)
    assert signature(half)["dtype"] == "torch.bfloat16" and signature(half) != base
    half_base = signature(half)
    with torch.no_grad():
        half.lm_head.weight.view(-1)[1] += 1.0
    assert signature(half)["sha256"] != half_base["sha256"]


def test_a_non_contiguous_tensor_hashes_as_its_contiguous_copy(monkeypatch):
    import hashlib

    tensor = torch.arange(3 * 5 * 7, dtype=torch.float32).reshape(3, 5, 7).permute(2, 0, 1)
    assert not tensor.is_contiguous()
    expected = hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()
    for chunk in (4, 8, 60, 2 ** 20):  # smaller than a row, than a block of rows, than all
        monkeypatch.setattr(signatures, "HASH_CHUNK_BYTES", chunk)
        digest = hashlib.sha256()
        signatures._hash_tensor(digest, tensor)
        assert digest.hexdigest() == expected, chunk


def test_weights_not_in_memory_are_never_taken_for_a_match(tokenizer, dataset, tmp_path):
    strong, weak = _pair(tokenizer)
    output = tmp_path / "scores.json"
    # An offloaded weight has no values to hash: nothing proves the file is of this model, even
    # when it was written by this very model (the hash sees the same names and shapes).
    weak.register_buffer("offloaded", torch.empty(4, device="meta"), persistent=False)
    selection.score_dataset(strong, weak, dataset[:2], output=output, progress=False)
    saved = output.read_text()
    assert json.loads(saved)["models"]["weak"]["tensors_without_data"] == 1
    with pytest.raises(ValueError, match=r"the weak model's weights are not all in memory "
                                         r"\(1 tensor\(s\) on the meta device"):
        selection.score_dataset(strong, weak, dataset[:2], output=output, progress=False)
    assert output.read_text() == saved


def test_a_version_1_scores_file_is_read_but_never_reused(pair, dataset, tmp_path):
    strong, weak = pair
    output = tmp_path / "scores.json"
    current = selection.score_dataset(strong, weak, dataset[:3], output=output, progress=False)
    document = json.loads(output.read_text())
    document["version"] = 1  # what an older wmss wrote: a sampled probe per model
    document["models"] = {name: {"class": model["class"],
                                 "num_parameters": model["num_parameters"],
                                 "dtype": model["dtype"], "probe": 1.25}
                          for name, model in document["models"].items()}
    old = json.dumps(document)
    output.write_text(old)
    loaded = selection.DatasetScores.load(output)
    assert torch.equal(loaded.entropy_weak, current.entropy_weak)
    assert loaded.metadata["models"]["weak"]["probe"] == 1.25

    with pytest.raises(ValueError, match=r"older wmss \(scores format version 1\).*"
                                         r"overwrite=True"):
        selection.score_dataset(strong, weak, dataset[:3], output=output, progress=False)
    with pytest.raises(ValueError, match=r"older wmss \(scores format version 1\)"):
        selection.check_scores_output(output, dataset[:3])
    assert output.read_text() == old

    counter = ForwardCounter({"strong": strong, "weak": weak})
    try:
        selection.score_dataset(strong, weak, dataset[:3], output=output, progress=False,
                                overwrite=True)
    finally:
        counter.remove()
    assert counter.examples == {"strong": 3, "weak": 3}  # recomputed, not reused
    assert json.loads(output.read_text())["version"] == selection.FORMAT_VERSION == 2


def test_check_scores_output_refuses_what_score_dataset_would_without_the_models(
        pair, dataset, tmp_path):
    strong, weak = pair
    output = tmp_path / "scores.json"
    selection.check_scores_output(output, dataset)  # no file yet: fine
    selection.score_dataset(strong, weak, dataset[:4], output=output, progress=False)
    selection.check_scores_output(output, dataset[:4])  # the same data: fine
    with pytest.raises(ValueError, match=r"does not hold these scores: it has 4 examples, the "
                                         r"data set 3.*overwrite=True"):
        selection.check_scores_output(output, dataset[:3])
    relabelled = [dict(e) for e in dataset[:4]]
    relabelled[0] = {"input_ids": dataset[0]["input_ids"],
                     "labels": dataset[0]["labels"][:-1] + [-100]}
    with pytest.raises(ValueError, match="different data set"):
        selection.check_scores_output(output, relabelled)
    selection.check_scores_output(output, relabelled, overwrite=True)
    with pytest.raises(ValueError, match=r"dataset\[0\] must be a dict"):
        selection.check_scores_output(output, [[1, 2]])
    (tmp_path / "notes.json").write_text("my notes\n")
    with pytest.raises(ValueError, match="not a wmss scores file"):
        selection.check_scores_output(tmp_path / "notes.json", dataset)


def test_dataset_scores_save_and_load_round_trip_exactly(tmp_path):
    scores = selection.DatasetScores(torch.rand(5, dtype=torch.float64),
                                     torch.rand(5, dtype=torch.float64),
                                     torch.tensor([3, 0, 1, 7, 2]), {"dataset_sha256": "abc"})
    scores.save(tmp_path / "s.json")
    loaded = selection.DatasetScores.load(tmp_path / "s.json")
    assert torch.equal(loaded.entropy_strong, scores.entropy_strong)
    assert torch.equal(loaded.entropy_weak, scores.entropy_weak)
    assert torch.equal(loaded.tokens, scores.tokens) and loaded.tokens.dtype == torch.int64
    assert loaded.metadata["dataset_sha256"] == "abc"
    assert torch.equal(loaded.discrepancy, scores.entropy_strong - scores.entropy_weak)


@pytest.mark.parametrize("corrupt, match", [
    (lambda text, doc: text[: len(text) // 2], "not valid JSON"),  # a half-written file
    (lambda text, doc: json.dumps({**doc, "complete": False}), "complete"),
    (lambda text, doc: json.dumps({**doc, "entropy_weak": [-1.0] + doc["entropy_weak"][1:]}),
     "malformed entry for example 0"),
    (lambda text, doc: json.dumps({**doc, "tokens": doc["tokens"][:-1]}), "malformed"),
    (lambda text, doc: json.dumps({**doc, "version": 99}), "version 99"),
])
def test_malformed_scores_files_are_rejected(tmp_path, corrupt, match):
    path = tmp_path / "scores.json"
    selection.DatasetScores([1.0, 2.0], [0.5, 0.0], [3, 4]).save(path)
    text = path.read_text()
    path.write_text(corrupt(text, json.loads(text)))
    with pytest.raises(ValueError, match=match):
        selection.DatasetScores.load(path)


def test_dataset_fingerprint_sees_ids_and_labels(dataset):
    base = selection.dataset_fingerprint(dataset)
    assert base == selection.dataset_fingerprint([dict(e) for e in dataset])
    relabelled = [dict(e) for e in dataset]
    relabelled[0] = {"input_ids": dataset[0]["input_ids"],  # the last token unsupervised
                     "labels": dataset[0]["labels"][:-1] + [-100]}
    assert selection.dataset_fingerprint(relabelled) != base
    assert selection.dataset_fingerprint(dataset[:-1]) != base
    fully_supervised = [{"input_ids": [1, 7, 8], "labels": [1, 7, 8]}]
    assert selection.dataset_fingerprint(fully_supervised, ignore_index=-1) != \
        selection.dataset_fingerprint(fully_supervised)


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(ValueError):  # not strict JSON: refused before the file is touched
        atomic_write_json(path, {"a": float("nan")})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "x" * 10_000)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left behind
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"


# --------------------------------------------------------------------------------------------
# summarize and the wmss select command
# --------------------------------------------------------------------------------------------

def test_summarize_reports_counts_means_and_term_shares():
    scores = selection.DatasetScores(H_STRONG, H_WEAK, [4, 2, 1, 0])
    weights = selection.sampling_weights(scores.entropy_strong, scores.entropy_weak)
    active = selection.draw_active(weights, 10, seed=0)
    summary = selection.summarize(scores, weights, active, num_draws=10, seed=0)
    assert summary["examples"] == 4 and summary["examples_without_supervised_tokens"] == 1
    assert summary["supervised_tokens"] == 7 and summary["selected"] == active.numel()
    assert math.isclose(summary["mean_entropy_strong"], 3.5 / 3)
    assert math.isclose(summary["mean_entropy_weak"], 3.0 / 3)
    assert summary["examples_weak_more_uncertain"] == 1
    assert summary["examples_strong_more_uncertain"] == 1
    # Weight mass 2.95 = alpha part 0.05 + beta part 2.8 + gamma part 0.1.
    share = summary["term_share"]
    assert math.isclose(share["alpha"], 0.05 / 2.95) and math.isclose(share["beta"], 2.8 / 2.95)
    assert math.isclose(share["gamma"], 0.1 / 2.95)
    p = weights / weights.sum()
    assert math.isclose(summary["expected_selected"], float((1 - (1 - p) ** 10).sum()))
    json.dumps(summary, allow_nan=False)  # JSON-ready


def test_summarize_counts_duplicates_with_and_without_keeping_them():
    scores = selection.DatasetScores(H_STRONG, H_WEAK, [4, 2, 1, 0])
    weights = selection.sampling_weights(scores.entropy_strong, scores.entropy_weak)
    every = selection.draw_active(weights, 50, seed=2, keep_duplicates=True)
    distinct = torch.unique(every)
    kept = selection.summarize(scores, weights, every, num_draws=50, keep_duplicates=True)
    assert kept["keep_duplicates"] is True and kept["active_size"] == 50
    assert kept["selected"] == distinct.numel() and kept["duplicates"] == 50 - distinct.numel()
    dropped = selection.summarize(scores, weights, distinct, num_draws=50)
    assert dropped["keep_duplicates"] is False and dropped["active_size"] == distinct.numel()
    assert dropped["duplicates"] == kept["duplicates"]
    with pytest.raises(ValueError, match="one index per draw"):
        selection.summarize(scores, weights, distinct, num_draws=50, keep_duplicates=True)
    with pytest.raises(ValueError, match="repeated indices.*keep_duplicates=True"):
        selection.summarize(scores, weights, every, num_draws=50)


def test_expected_selected_is_exact_for_tiny_probabilities_and_many_draws():
    scores = selection.DatasetScores([1.0, 1.0], [1.0, 1.0], [1, 1])
    weights = torch.tensor([1.0, 1e-17], dtype=torch.float64)
    active = selection.draw_active(weights, 10 ** 13, seed=0)
    summary = selection.summarize(scores, weights, active, num_draws=10 ** 13)
    # 1 - (1 - 1e-17)^1e13 = 1 - exp(-1e-4); in float64, 1 - 1e-17 rounds to 1 and gives 0.
    assert math.isclose(summary["expected_selected"], 1 - math.expm1(-1e-4), rel_tol=1e-12)


def test_selection_options_defaults_are_the_papers():
    options = selection.SelectionOptions()
    assert (options.alpha, options.beta, options.gamma) == (0.1, 0.8, 0.1)
    assert (options.normalize, options.entropy_term) == ("paper", "strong")
    assert options.num_draws is None and options.seed == 0 and options.keep_duplicates is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 1


def test_selection_options_store_plain_numbers():
    import numpy as np

    options = selection.SelectionOptions(alpha=1, beta=np.float32(0.5), gamma=0, seed=np.int64(3),
                                         num_draws=np.int32(7))
    assert [type(v) for v in (options.alpha, options.beta, options.gamma)] == [float] * 3
    assert type(options.seed) is int and type(options.num_draws) is int
    assert (options.alpha, options.beta, options.seed, options.num_draws) == (1.0, 0.5, 3, 7)


@pytest.mark.parametrize("fields, error, match", [
    (dict(alpha=-0.1), ValueError, "alpha must be a finite number >= 0"),
    (dict(beta=float("nan")), ValueError, "beta must be a finite number >= 0, got nan"),
    (dict(gamma=float("inf")), ValueError, "gamma must be a finite number >= 0, got inf"),
    (dict(alpha=0, beta=0.0, gamma=0), ValueError, "alpha, beta and gamma are all 0"),
    (dict(alpha=True), TypeError, "alpha must be a real number, got bool"),
    (dict(beta="0.8"), TypeError, "beta must be a real number, got str"),
    (dict(normalize="softmax"), ValueError, "normalize must be one of"),
    (dict(entropy_term=None), TypeError, "entropy_term must be one of"),
    (dict(num_draws=0), ValueError, "num_draws must be >= 1, got 0"),
    (dict(num_draws=2 ** 63), ValueError, r"num_draws must be < 2\*\*63"),
    (dict(num_draws=10.0), TypeError, "num_draws must be an int, got float"),
    (dict(num_draws=True), TypeError, "num_draws must be an int, got bool"),
    (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
    (dict(seed=2 ** 63), ValueError, r"seed must be < 2\*\*63"),
    (dict(seed=False), TypeError, "seed must be an int, got bool"),
    (dict(keep_duplicates="yes"), TypeError, "keep_duplicates must be True or False"),
    (dict(keep_duplicates=True, num_draws=2 ** 31 + 1), ValueError,
     "num_draws=2147483649 is too many to keep every draw"),
])
def test_selection_options_reject_every_bad_field_naming_it(fields, error, match):
    with pytest.raises(error, match=match):
        selection.SelectionOptions(**fields)


def test_selection_options_allow_the_largest_draws():
    assert selection.SelectionOptions(num_draws=2 ** 63 - 1).num_draws == 2 ** 63 - 1
    assert selection.SelectionOptions(num_draws=2 ** 31, keep_duplicates=True).num_draws == 2 ** 31
    assert selection.SelectionOptions(seed=2 ** 63 - 1).seed == 2 ** 63 - 1


def test_select_active_is_weights_then_draws_then_summary():
    scores = selection.DatasetScores(torch.rand(30, dtype=torch.float64) * 2,
                                     torch.rand(30, dtype=torch.float64) * 2,
                                     torch.randint(1, 9, (30,)), {"dataset_sha256": "abc"})
    weight_options = dict(alpha=0.5, beta=0.2, gamma=0.3, normalize="per_term",
                          entropy_term="weak")
    for keep_duplicates, num_draws in ((False, None), (True, None), (True, 45), (False, 7)):
        options = selection.SelectionOptions(**weight_options, num_draws=num_draws, seed=9,
                                             keep_duplicates=keep_duplicates)
        chosen = selection.select_active(scores, options)
        weights = selection.sampling_weights(scores.entropy_strong, scores.entropy_weak,
                                             **weight_options)
        draws = 30 if num_draws is None else num_draws  # None: |D|, the data set's size
        active = selection.draw_active(weights, draws, seed=9, keep_duplicates=keep_duplicates)
        assert torch.equal(chosen.weights, weights) and chosen.weights.dtype == torch.float64
        assert torch.equal(chosen.active, active) and chosen.active.dtype == torch.int64
        assert chosen.summary == selection.summarize(scores, weights, active, num_draws=draws,
                                                     seed=9, keep_duplicates=keep_duplicates,
                                                     **weight_options)
        assert chosen.summary["num_draws"] == draws
        if keep_duplicates:
            assert chosen.active.numel() == draws
    with pytest.raises(TypeError, match="options must be a SelectionOptions"):
        selection.select_active(scores, {"alpha": 0.1})
    with pytest.raises(TypeError, match="scores must be a DatasetScores"):
        selection.select_active([1.0, 2.0], selection.SelectionOptions())


def test_save_selection_writes_the_active_set_and_summary(tmp_path):
    scores = selection.DatasetScores(H_STRONG, H_WEAK, [4, 2, 1, 0])
    chosen = selection.select_active(scores, selection.SelectionOptions(num_draws=9,
                                                                        keep_duplicates=True))
    out = tmp_path / "new" / "selection"
    selection.save_selection(chosen, out, extra_summary={"data": "/d.jsonl"})
    assert sorted(os.listdir(out)) == sorted([selection.ACTIVE_FILE, selection.SUMMARY_FILE])
    assert json.loads((out / selection.ACTIVE_FILE).read_text()) == chosen.active.tolist()
    assert len(json.loads((out / selection.ACTIVE_FILE).read_text())) == 9
    assert json.loads((out / selection.SUMMARY_FILE).read_text()) == \
        {**chosen.summary, "data": "/d.jsonl"}

    before = {name: (out / name).read_text() for name in os.listdir(out)}
    other = selection.select_active(scores, selection.SelectionOptions(num_draws=2))
    assert other.active.tolist() != chosen.active.tolist()
    with pytest.raises(ValueError, match=r"replace the summary's own entries \['seed'\]"):
        selection.save_selection(other, out, extra_summary={"seed": 5})
    with pytest.raises(ValueError):  # not JSON: refused before either file is touched
        selection.save_selection(other, out, extra_summary={"note": float("nan")})
    with pytest.raises(TypeError, match="extra_summary must be a dict"):
        selection.save_selection(other, out, extra_summary=["data"])
    with pytest.raises(TypeError, match="selection must be a Selection"):
        selection.save_selection(chosen.summary, out)
    assert {name: (out / name).read_text() for name in os.listdir(out)} == before


@pytest.fixture
def saved_pair(tmp_path, tokenizer):
    strong, weak = _pair(tokenizer)
    paths = {"strong": tmp_path / "strong", "weak": tmp_path / "weak"}
    strong.save_pretrained(paths["strong"])
    weak.save_pretrained(paths["weak"])
    tokenizer.save_pretrained(paths["strong"])
    return paths


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_wmss_select_end_to_end(saved_pair, tmp_path, tokenizer, capsys, monkeypatch):
    records = RECORDS + [{"messages": [{"role": "user", "content": "no answer"}]}]
    data_file = tmp_path / "train.jsonl"
    _write_jsonl(data_file, records)
    out = tmp_path / "selection"
    argv = ["select", "--strong", str(saved_pair["strong"]), "--weak", str(saved_pair["weak"]),
            "--data", str(data_file), "--output-dir", str(out), "--batch-size", "3",
            "--no-progress", "--backend", "torch"]
    assert wmss.commands.main(argv) == 0
    printed = capsys.readouterr().out

    scores = selection.DatasetScores.load(out / "scores.json")
    encoded = data.encode_records(records, tokenizer)
    assert scores.tokens.tolist() == [batches.supervised_tokens(e) for e in encoded]
    assert scores.tokens[-1] == 0 and bool((scores.tokens[:-1] > 0).all())
    strong, weak = _pair(tokenizer)
    assert_close(scores.entropy_strong, reference_scores(strong, encoded), 1e-5, "strong")
    assert_close(scores.entropy_weak, reference_scores(weak, encoded), 1e-5, "weak")

    active = json.loads((out / "active_indices.json").read_text())
    weights = selection.sampling_weights(scores.entropy_strong, scores.entropy_weak)
    assert active == selection.draw_active(weights, seed=0).tolist()
    assert len(records) - 1 not in active

    summary = json.loads((out / "selection_summary.json").read_text())
    assert summary["examples"] == len(records)
    assert summary["examples_without_supervised_tokens"] == 1
    assert summary["selected"] == len(active) and summary["num_draws"] == len(records)
    assert math.isclose(sum(summary["term_share"].values()), 1.0)
    assert summary["options"]["normalize"] == "paper"
    assert f"selected: {len(active)} of {len(records)}" in printed
    assert "alpha*[-dH]_+" in printed and "beta*H_strong" in printed

    # Existing outputs are kept unless --overwrite.
    before = {name: (out / name).read_text() for name in os.listdir(out)}
    assert wmss.commands.main(argv + ["--seed", "1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert {name: (out / name).read_text() for name in os.listdir(out)} == before

    # With --overwrite, new options re-select from the same scores: no model pass.
    passes = []
    real = scoring._entropy_sums
    monkeypatch.setattr(scoring, "_entropy_sums",
                        lambda *a, **k: passes.append(1) or real(*a, **k))
    options = ["--overwrite", "--seed", "1", "--normalize", "per_term", "--num-draws", "4",
               "--alpha", "0.5", "--beta", "0.2", "--gamma", "0.3"]
    assert wmss.commands.main(argv + options) == 0
    assert passes == []
    weights = selection.sampling_weights(scores.entropy_strong, scores.entropy_weak, alpha=0.5,
                                         beta=0.2, gamma=0.3, normalize="per_term")
    assert json.loads((out / "active_indices.json").read_text()) == \
        selection.draw_active(weights, 4, seed=1).tolist()
    summary = json.loads((out / "selection_summary.json").read_text())
    assert summary["num_draws"] == 4 and summary["options"]["normalize"] == "per_term"


def test_wmss_select_help_and_argument_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        wmss.commands.main(["select", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--strong", "--weak", "--data", "--output-dir", "--normalize", "--num-draws",
                   "--overwrite"):
        assert option in help_text
    with pytest.raises(SystemExit):
        wmss.commands.main(["select", "--strong", "s", "--weak", "w", "--data", "d.jsonl",
                       "--output-dir", str(tmp_path), "--alpha", "-1"])
    assert "must be a finite number >= 0" in capsys.readouterr().err
    missing = ["select", "--strong", "s", "--weak", "w", "--data", str(tmp_path / "none.jsonl"),
               "--output-dir", str(tmp_path / "out")]
    assert wmss.commands.main(missing) == 1
    assert "wmss select: error:" in capsys.readouterr().err
