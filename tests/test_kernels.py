"""The launchers of ``wmss_kernels`` and the torch engine under every decomposition of the work.

The public API picks tile shapes, vocabulary splits and token chunks itself; these tests force
each of them (tiny tiles, many splits, many chunks, ragged edges) and compare with float64.
"""

import pytest
import torch
from conftest import DEVICE, TRITON_AVAILABLE, assert_close, make_inputs
from oracle import GapDecisions, truth

from wmss.loss.engines.contract import GradRequest, MixedLossSpec, ModelInputs, TokenCoefficients
from wmss.loss.engines.torch_engine import TorchEngine
from wmss_kernels.config import Tiles

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

ALL = GradRequest(True, True, True)
SPECS = {
    # Soft-capping and gap masking: one logit-gradient buffer per model.
    "softcap-gap": MixedLossSpec(lam=0.3, softcap=8.0, gap_threshold=0.0, ignore_index=-100),
    # The paper's loss: one buffer shared by both models, scaled by lam and 1 - lam.
    "shared-gradient": MixedLossSpec(lam=0.3, softcap=None, gap_threshold=None,
                                     ignore_index=-100),
}


def models_of(inputs):
    """The strong and the weak model's flat, detached ``ModelInputs`` from ``make_inputs``'s."""
    def model(prefix):
        hidden = inputs[f"{prefix}_hidden"].detach()
        return ModelInputs(hidden.reshape(-1, hidden.shape[-1]),
                           inputs[f"{prefix}_weight"].detach(), inputs[f"{prefix}_bias"].detach())
    return model("strong"), model("weak")


def flat_inputs(dtype=torch.float32, shape=(5, 23), vocab=333, d_strong=72, d_weak=40):
    inputs, labels = make_inputs(shape=shape, vocab=vocab, d_strong=d_strong, d_weak=d_weak,
                                 dtype=dtype, bias=True)
    return inputs, labels, models_of(inputs)


def upstream_coefficients(stats, labels, spec):
    """A random per-token upstream gradient, split into mixed and plain-strong parts (the
    latter None without gap masking)."""
    upstream = torch.rand(labels.numel(), device=DEVICE) * (labels.reshape(-1) != -100)
    coef_strong = torch.where(stats.mixed, 0.0, upstream)
    return upstream, TokenCoefficients(torch.where(stats.mixed, upstream, 0.0),
                                       None if spec.gap_threshold is None else coef_strong)


def decisions_of(stats) -> GapDecisions:
    return GapDecisions(stats.mixed, stats.entropy_strong, stats.entropy_weak)


def check(spec, stats, grads, inputs, labels, upstream, tol):
    expected = truth(inputs, labels, lam=spec.lam, softcap=spec.softcap,
                     gap_threshold=spec.gap_threshold, upstream=upstream,
                     decisions=decisions_of(stats))
    assert_close(stats.loss, expected.loss, tol, "loss")
    assert_close(stats.entropy_strong, expected.entropy_strong, tol, "entropy_strong", atol=1e-6)
    assert_close(stats.entropy_weak, expected.entropy_weak, tol, "entropy_weak", atol=1e-6)
    assert_close(stats.logprob_mix, expected.logprob_mix, tol, "logprob_mix", atol=1e-6)
    assert torch.equal(stats.mixed.cpu(), expected.mixed.cpu())
    strong, weak = grads
    names = ["strong_hidden", "strong_weight", "strong_bias", "weak_hidden", "weak_weight",
             "weak_bias"]
    for name, got in zip(names, [*strong, *weak]):
        want = expected.grads[name]
        assert_close(got.reshape(want.shape), want, tol, name)


needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")


# Tiles, vocabulary splits and (token chunk, vocabulary block) pieces the decomposition test
# forces. Every tile here must be legal on a GPU too (tests/test_compile_check.py builds them).
DECOMPOSITIONS = [
    # Many tiny tiles, uneven splits; many token chunks (dW accumulates in float32).
    (Tiles(16, 16, 16, num_warps=4), 7, (16, 16)),
    # Token chunks and vocabulary blocks that are not multiples of the tile.
    (Tiles(32, 64, 32, num_warps=4), 2, (48, 100)),
    # All tokens at once, several vocabulary blocks: each dW block is written once.
    (Tiles(16, 32, 16, num_warps=4), 3, (10**6, 64)),
    # The production tiles (config's, per dtype and architecture) and automatic choices.
    (None, None, None),
    # One split; one piece holding the whole [N, V] gradient.
    (Tiles(16, 256, 32, num_warps=4), 1, (10**6, 10**6)),
]
# The tiles of the grouping test below.
GROUPING_TILES = Tiles(16, 32, 16, num_warps=4)


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("logit_source", ["triton", "cublas"])
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
@pytest.mark.parametrize("tiles, num_splits, blocks", DECOMPOSITIONS)
def test_triton_launchers_under_every_decomposition(tiles, num_splits, blocks, spec,
                                                    logit_source, monkeypatch):
    from wmss_kernels import config, mixed_ce_backward, mixed_token_stats
    from wmss_kernels.logit_grad import GradBlocks

    # The "cublas" forward reads logit blocks of about 100 columns: several blocks, merged.
    monkeypatch.setattr(config, "STATS_LOGIT_BYTES", 115 * 100 * 8)
    monkeypatch.setattr(config, "LOGIT_SOURCE", logit_source)
    inputs, labels, (strong, weak) = flat_inputs()
    flat_labels = labels.reshape(-1)
    stats = mixed_token_stats(strong, weak, flat_labels, spec, tiles=tiles, num_splits=num_splits)
    upstream, coefficients = upstream_coefficients(stats, labels, spec)
    grads = mixed_ce_backward(strong, weak, flat_labels, stats.log_sum_exps, coefficients, spec,
                              (ALL, ALL), tiles=tiles,
                              blocks=None if blocks is None else GradBlocks(*blocks))
    check(spec, stats, grads, inputs, labels, upstream, 1e-5)


@needs_triton
@pytest.mark.parametrize("logit_source", ["triton", "cublas"])
@pytest.mark.parametrize("strong_dtype, weak_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)], ids=str)
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_low_precision_gradients_in_several_blocks(strong_dtype, weak_dtype, spec, logit_source):
    """Gradients stored in 2-byte dtypes (for "cublas", over the float32 logits they replace,
    with a different row stride per model when the dtypes differ), in several pieces."""
    from wmss_kernels import mixed_ce_backward, mixed_token_stats
    from wmss_kernels.logit_grad import GradBlocks

    inputs, labels = make_inputs(shape=(5, 23), vocab=333, d_strong=72, d_weak=40, bias=True)
    dtypes = {k: strong_dtype if k.startswith("strong") else weak_dtype for k in inputs}
    inputs = {k: v.detach().to(dtypes[k]).requires_grad_() for k, v in inputs.items()}
    strong, weak = models_of(inputs)
    flat_labels = labels.reshape(-1)
    stats = mixed_token_stats(strong, weak, flat_labels, spec, logit_source=logit_source)
    upstream, coefficients = upstream_coefficients(stats, labels, spec)
    grads = mixed_ce_backward(strong, weak, flat_labels, stats.log_sum_exps, coefficients, spec,
                              (ALL, ALL), blocks=GradBlocks(50, 96), logit_source=logit_source)
    for grad, name in zip([*grads[0], *grads[1]], ["strong_hidden", "strong_weight",
                                                   "strong_bias", "weak_hidden", "weak_weight",
                                                   "weak_bias"]):
        assert grad.dtype in (dtypes[name], torch.float32), name
    check(spec, stats, grads, inputs, labels, upstream, 1e-2)


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tiles_per_group", [1, 3])
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_l2_groups_of_any_size_cover_every_tile_once(tiles_per_group, spec, dtype, monkeypatch):
    """Programs visit (token tile, vocabulary tile) pairs in groups of token tiles; 8 token
    tiles in groups of 3 leave a ragged last group. bf16 runs the single-accumulator kernel of
    the paper's loss, both trained and with the weak model frozen."""
    from wmss_kernels import config, mixed_ce_backward, mixed_token_stats
    from wmss_kernels.logit_grad import GradBlocks

    tiles = GROUPING_TILES
    row_bytes = (72 + 40) * torch.empty((), dtype=dtype).element_size()
    monkeypatch.setattr(config, "L2_GROUP_BYTES", tiles_per_group * tiles.block_n * row_bytes)
    assert config.token_tiles_per_group(tiles.block_n, row_bytes) == tiles_per_group
    inputs, labels, _ = flat_inputs(shape=(5, 23))  # 115 tokens: 8 token tiles of 16
    inputs = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
    strong, weak = models_of(inputs)
    flat_labels = labels.reshape(-1)
    stats = mixed_token_stats(strong, weak, flat_labels, spec, tiles=tiles, num_splits=3)
    upstream, coefficients = upstream_coefficients(stats, labels, spec)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    expected = truth(inputs, labels, lam=spec.lam, softcap=spec.softcap,
                     gap_threshold=spec.gap_threshold, upstream=upstream,
                     decisions=decisions_of(stats))
    none = GradRequest(False, False, False)
    # Both trained; the weak model frozen; the strong one frozen (only the weak trained).
    for strong_request, weak_request in ((ALL, ALL), (ALL, none), (none, ALL)):
        grads = mixed_ce_backward(strong, weak, flat_labels, stats.log_sum_exps, coefficients,
                                  spec, (strong_request, weak_request), tiles=tiles,
                                  blocks=GradBlocks(10**6, 96))
        if strong_request.any and weak_request.any:
            check(spec, stats, grads, inputs, labels, upstream, tol)
            continue
        trained, frozen = ("strong", "weak") if strong_request.any else ("weak", "strong")
        assert grads[0 if frozen == "strong" else 1] == (None, None, None)
        for field, got in zip(["hidden", "weight", "bias"],
                              grads[0 if trained == "strong" else 1]):
            want = expected.grads[f"{trained}_{field}"]
            assert_close(got.reshape(want.shape), want, tol, f"{frozen} frozen: {trained}_{field}")


@needs_triton
def test_an_unknown_logit_source_is_refused_by_name(monkeypatch):
    from wmss_kernels import config, mixed_token_stats

    monkeypatch.setattr(config, "LOGIT_SOURCE", "tensorcores")
    inputs, labels, (strong, weak) = flat_inputs()
    with pytest.raises(ValueError, match="WMSS_LOGIT_SOURCE"):
        mixed_token_stats(strong, weak, labels.reshape(-1), SPECS["shared-gradient"])


@needs_triton
@pytest.mark.parametrize("num_tokens, vocab, budget, expected", [
    (100, 333, 10**9, (100, 333)),            # everything fits: one piece
    (4096, 151936, 64 * 2**20, (4096, 8192)),  # all tokens, 8192-wide vocabulary blocks
    (10**6, 151936, 64 * 2**20, (32768, 1024)),  # too many tokens: chunks of the narrowest block
    (10, 500, 1, (10, 500)),                  # a vocabulary below the narrowest block: one block
])
def test_gradient_blocks_fit_the_budget_and_keep_all_tokens_together_when_they_can(
        num_tokens, vocab, budget, expected):
    from wmss_kernels.logit_grad import plan_grad_blocks

    tiles = Tiles(64, 128, 64)
    blocks = plan_grad_blocks(num_tokens, vocab, 2, budget, tiles)
    assert (blocks.token_chunk, blocks.vocab_block) == expected
    fits = blocks.token_chunk * blocks.vocab_block * 2 <= budget
    assert fits or blocks.vocab_block == min(vocab, 1024) or budget < tiles.block_n * 2


@needs_triton
def test_gradient_buffers_take_a_fixed_fraction_of_the_gradients():
    from wmss_kernels import config
    from wmss_kernels.logit_grad import gradient_buffer_budget

    gradients = 2 * (151936 + 16384) * 2560 * 2  # the headline pair's bf16 gradients
    assert gradient_buffer_budget(gradients) == int(config.GRAD_BUFFER_FRACTION * gradients)
    assert gradient_buffer_budget(1) == config.GRAD_BUFFER_MIN_BYTES
    assert gradient_buffer_budget(10**12) == config.GRAD_BUFFER_MAX_BYTES


@pytest.mark.parametrize("token_block, vocab_block", [(7, 50), (16, 333), (1000, 64)])
def test_torch_engine_under_every_block_shape(token_block, vocab_block):
    spec = SPECS["softcap-gap"]
    engine = TorchEngine(token_block=token_block, vocab_block=vocab_block)
    inputs, labels, (strong, weak) = flat_inputs()
    flat_labels = labels.reshape(-1)
    stats = engine.mixed_forward(strong, weak, flat_labels, spec)
    upstream, coefficients = upstream_coefficients(stats, labels, spec)
    grads = engine.mixed_backward(strong, weak, flat_labels, stats.log_sum_exps, coefficients,
                                  spec, (ALL, ALL))
    check(spec, stats, grads, inputs, labels, upstream, 1e-5)


@needs_triton
def test_backward_skips_the_weak_products_when_nothing_weak_is_requested():
    from wmss_kernels import mixed_ce_backward, mixed_token_stats

    inputs, labels, models = flat_inputs()
    flat_labels = labels.reshape(-1)
    spec = SPECS["shared-gradient"]
    stats = mixed_token_stats(*models, flat_labels, spec)
    coefficients = TokenCoefficients((flat_labels != -100).float(), None)
    none = GradRequest(False, False, False)
    strong, weak = mixed_ce_backward(*models, flat_labels, stats.log_sum_exps, coefficients, spec,
                                     (GradRequest(False, True, False), none))
    assert strong.hidden is None and strong.bias is None and strong.weight is not None
    assert weak == (None, None, None)


def test_float32_dots_follow_pytorchs_cuda_matmul_setting():
    from wmss_kernels.config import dot_precision

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("PyTorch < 2.9 has only the legacy float32 matmul setting")
    saved = matmul.fp32_precision, torch.backends.fp32_precision
    try:
        assert dot_precision() == ("tf32" if saved[0] == "tf32" else "ieee")
        matmul.fp32_precision = "tf32"
        assert dot_precision() == "tf32"
        matmul.fp32_precision = "ieee"
        assert dot_precision() == "ieee"
        matmul.fp32_precision, torch.backends.fp32_precision = "none", "tf32"
        assert dot_precision() == "tf32"  # "none" defers to the global setting
        torch.backends.fp32_precision = "ieee"
        assert dot_precision() == "ieee"
        torch.set_float32_matmul_precision("high")  # the legacy API lands in the same place
        assert dot_precision() == "tf32"
    finally:
        matmul.fp32_precision, torch.backends.fp32_precision = saved


@needs_triton
def test_the_weight_gradient_scratch_is_counted_in_the_gradient_budget():
    from wmss_kernels.logit_grad import plan_grad_blocks

    tiles = Tiles(64, 128, 64)
    budget, num_tokens, column = 64 * 2**20, 4096, 4 * 2560
    plain = plan_grad_blocks(num_tokens, 151936, 2, budget, tiles)
    blocks = plan_grad_blocks(num_tokens, 151936, 2, budget, tiles, bytes_per_column=column)
    assert blocks.token_chunk == num_tokens and blocks.vocab_block < plain.vocab_block
    assert blocks.vocab_block * (num_tokens * 2 + column) <= budget
    assert blocks.vocab_block % tiles.block_v == 0
    # All tokens fit beside the narrowest block, but not with the scratch: a narrower block,
    # still within the budget and still one chunk (no float32 [V, d] accumulators).
    narrow = plan_grad_blocks(4096, 32000, 2, 32 * 2**20, Tiles(128, 128, 64),
                              bytes_per_column=4 * 8192)
    assert narrow.token_chunk == 4096 and narrow.vocab_block < 1024
    assert narrow.vocab_block * (4096 * 2 + 4 * 8192) <= 32 * 2**20


@needs_triton
def test_in_place_gradients_of_the_cublas_source_are_repeatable_to_the_bit():
    """The "cublas" backward overwrites each float32 logit row with its bf16 gradients. A block
    width that is not a multiple of 16 (333 = 3 x 96 + 45) is where, on a GPU, a warp that ran
    ahead could overwrite logits another warp had not read yet (the kernel's barrier prevents
    it): any such race shows as runs that differ."""
    from wmss_kernels import mixed_ce_backward, mixed_token_stats
    from wmss_kernels.logit_grad import GradBlocks

    inputs, labels, (strong, weak) = flat_inputs(dtype=torch.bfloat16)
    flat_labels = labels.reshape(-1)
    spec = SPECS["softcap-gap"]
    stats = mixed_token_stats(strong, weak, flat_labels, spec, logit_source="cublas")
    _, coefficients = upstream_coefficients(stats, labels, spec)
    runs = [mixed_ce_backward(strong, weak, flat_labels, stats.log_sum_exps, coefficients, spec,
                              (ALL, ALL), blocks=GradBlocks(10**6, 96), logit_source="cublas")
            for _ in range(5 if DEVICE.type == "cuda" else 2)]
    first = [g for model in runs[0] for g in model]
    for run in runs[1:]:
        for a, b in zip(first, [g for model in run for g in model]):
            assert torch.equal(a, b)
