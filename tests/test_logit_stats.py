"""wmss.logit_stats: every per-token field on every backend against float64 (tests/oracle.py),
its edge cases (no labels, everything ignored, V = 1, ties, |z| ~ 1e4), its memory bound, its
input checks, and ``wmss inspect`` end to end on tiny models."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from conftest import BACKENDS, DEVICE, TOLERANCE, TRITON_AVAILABLE, assert_close
from oracle import logit_truth

import wmss
from wmss import commands as cli

logit_stats_module = importlib.import_module("wmss.loss.logit_statistics")

FLOAT_FIELDS = ("target_logit", "mean_logit", "mean_nontarget_logit", "max_nontarget_logit",
                "margin", "entropy", "logprob")
FLOAT64_TOLERANCE = 1e-12
# Per-element slack of statistics that can be ~0 everywhere (entropies of peaked rows, 0 fields).
ATOL = 1e-6
# Logits that agree within this (relative to the row's largest |z|) may be ranked either way by
# a float32 computation: the rank is checked against the float64 ranks at +-this slack.
RANK_SLACK = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}


def check_against_truth(stats, truth, dtype, what=""):
    tol = TOLERANCE.get(dtype, FLOAT64_TOLERANCE)
    result_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in FLOAT_FIELDS:
        got = getattr(stats, name)
        assert got.dtype == result_dtype, (name, got.dtype)
        assert not got.requires_grad
        assert_close(got.reshape(-1), getattr(truth, name), tol, f"{what} {name}", atol=ATOL)
    assert stats.rank.dtype == torch.int64
    # Per token, at its own scale: logits that agree to the computation's rounding may be
    # ranked either way.
    slack = RANK_SLACK[dtype] * truth.logits.abs().amax(1).clamp_min(1.0)
    low, high = truth.rank_range(slack)
    rank = stats.rank.reshape(-1).cpu()
    assert ((rank >= low) & (rank <= high)).all(), (f"{what} rank", rank.tolist(),
                                                    truth.rank.tolist())


def random_head(shape=(3, 13), vocab=301, d=40, dtype=torch.float32, bias=False, scale=3.0):
    hidden = torch.randn(*shape, d, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, d, device=DEVICE) * scale / d ** 0.5).to(dtype)
    b = torch.randn(vocab, device=DEVICE).to(dtype) if bias else None
    labels = torch.randint(0, vocab, shape, device=DEVICE)
    labels[torch.rand(shape, device=DEVICE) < 0.25] = -100
    return hidden, weight, b, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_field_matches_float64(backend, dtype):
    """Ragged sizes (no multiple of any tile), a quarter of the labels ignored, with and without
    bias and soft-cap."""
    hidden, weight, bias, labels = random_head(dtype=dtype, bias=True)
    for options in (dict(), dict(bias=bias, softcap=2.5)):
        stats = wmss.logit_stats(hidden, weight, labels, backend=backend, **options)
        assert stats.target_logit.shape == labels.shape
        truth = logit_truth(hidden, weight, labels, **options)
        check_against_truth(stats, truth, dtype, str(options.keys()))
        ignored = (labels == -100).cpu()
        for name in (*FLOAT_FIELDS, "rank"):
            assert getattr(stats, name).cpu()[ignored].abs().max() == 0, name


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_float64_inputs_give_float64_accurate_statistics(backend):
    hidden, weight, bias, labels = random_head(dtype=torch.float64, bias=True)
    stats = wmss.logit_stats(hidden, weight, labels, bias=bias, softcap=2.5, backend=backend)
    check_against_truth(stats, logit_truth(hidden, weight, labels, bias=bias, softcap=2.5),
                        torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_labels_every_position_is_scored_with_no_target(backend):
    """No target: target_logit, margin, rank and logprob are 0; every logit is a non-target one,
    so the non-target mean is the mean and the non-target max the largest logit."""
    hidden, weight, bias, _ = random_head(bias=True)
    stats = wmss.logit_stats(hidden, weight, bias=bias, backend=backend)
    truth = logit_truth(hidden, weight, bias=bias)
    check_against_truth(stats, truth, torch.float32, "no labels")
    for name in ("target_logit", "margin", "rank", "logprob"):
        assert getattr(stats, name).abs().max() == 0, name
    z = truth.logits
    assert_close(stats.max_nontarget_logit.reshape(-1), z.amax(1), 1e-6, "max logit")
    assert_close(stats.mean_nontarget_logit, stats.mean_logit, 1e-6, "mean")
    assert stats.entropy.min() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zeros(backend):
    hidden, weight, bias, labels = random_head(bias=True)
    labels = torch.full_like(labels, -7)
    stats = wmss.logit_stats(hidden, weight, labels, bias=bias, ignore_index=-7, backend=backend)
    for name in (*FLOAT_FIELDS, "rank"):
        assert getattr(stats, name).abs().max() == 0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_vocabulary_of_one_has_no_nontarget_logit(backend):
    hidden = torch.randn(2, 5, 8, device=DEVICE)
    weight = torch.randn(1, 8, device=DEVICE)
    labels = torch.zeros(2, 5, dtype=torch.long, device=DEVICE)
    stats = wmss.logit_stats(hidden, weight, labels, backend=backend)
    z = (hidden @ weight.T).squeeze(-1)
    assert_close(stats.target_logit, z, 1e-6)
    assert_close(stats.mean_logit, z, 1e-6)
    for name in ("mean_nontarget_logit", "max_nontarget_logit", "margin", "rank"):
        assert getattr(stats, name).abs().max() == 0, name
    for name in ("entropy", "logprob"):  # one logit: probability 1, to float32 rounding
        assert getattr(stats, name).abs().max() < 1e-6, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_counts_strictly_greater_logits_and_ties_do_not_count(backend):
    """Exactly representable logits (integers): the target ties two columns, and three are above
    it; the target's own column never counts, whatever it is compared with."""
    d, vocab = 4, 70
    hidden = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3, device=DEVICE)
    weight = torch.zeros(vocab, d, device=DEVICE)
    weight[:, 0] = -5.0
    weight[10, 0] = weight[20, 0] = weight[40, 0] = 2.0      # the target (10) and two ties
    weight[[3, 50, 69], 0] = 3.0                             # strictly above
    labels = torch.tensor([10, 3, 69], device=DEVICE)
    stats = wmss.logit_stats(hidden, weight, labels, backend=backend)
    assert stats.rank.tolist() == [3, 0, 0]  # 3, 50 and 69 tie each other: none counts
    assert stats.margin.tolist() == [-1.0, 0.0, 0.0]
    assert stats.max_nontarget_logit.tolist() == [3.0, 3.0, 3.0]
    truth = logit_truth(hidden, weight, labels)
    assert stats.rank.cpu().tolist() == truth.rank.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    """|z| ~ 1e4 with exactly representable inputs (integers), so float32 logits are exact and
    the float32 tolerance applies to everything computed from them, ranks (with many ties)
    exactly: peaked rows, and a large common offset."""
    shape, vocab, d = (2, 19), 300, 40
    for offset in (0.0, 1.0e4):
        hidden = torch.randint(-1, 2, (*shape, d), device=DEVICE).float()
        weight = torch.randint(-300, 301, (vocab, d), device=DEVICE).float()
        bias = torch.full((vocab,), offset, device=DEVICE)
        labels = torch.randint(0, vocab, shape, device=DEVICE)
        labels[0, :3] = -100
        stats = wmss.logit_stats(hidden, weight, labels, bias=bias, backend=backend)
        truth = logit_truth(hidden, weight, labels, bias=bias)
        check_against_truth(stats, truth, torch.float32, f"offset {offset}")
        assert stats.rank.reshape(-1).cpu().tolist() == truth.rank.tolist()
        assert truth.logits.abs().max() > 1e3 + offset  # peaked rows: logit gaps ~1e3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dominant_target_keeps_the_nontarget_mean_exact(backend):
    """The non-target sum is accumulated without the target (``sum - z[y]`` would lose the
    small non-target logits next to a target of 1e6)."""
    hidden = torch.ones(4, 1, device=DEVICE)
    weight = (torch.arange(200, device=DEVICE, dtype=torch.float32) * 1e-3 + 0.1)[:, None]
    weight[7] = 1.0e6
    labels = torch.full((4,), 7, device=DEVICE)
    stats = wmss.logit_stats(hidden, weight, labels, backend=backend)
    truth = logit_truth(hidden, weight, labels)
    assert_close(stats.mean_nontarget_logit, truth.mean_nontarget_logit, 1e-6, "mean non-target")


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_vocabulary_splits_merge_to_the_same_statistics():
    """Several vocabulary splits and small tiles (many token and vocabulary tiles): the merge of
    the partials gives the float64 statistics, like one split."""
    from wmss_kernels.config import Tiles
    from wmss_kernels.logit_stats import logit_token_stats
    from wmss.loss.engines.contract import ModelInputs

    hidden, weight, bias, labels = random_head(shape=(45,), vocab=203, d=24, bias=True)
    truth = logit_truth(hidden, weight, labels, bias=bias, softcap=4.0)
    for splits in (1, 3, 13):
        raw = logit_token_stats(ModelInputs(hidden, weight, bias), labels, softcap=4.0,
                                ignore_index=-100, tiles=Tiles(16, 16, 16, num_warps=4),
                                num_splits=splits)
        check_against_truth(wmss.LogitStats(**raw._asdict()), truth, torch.float32,
                            f"{splits} splits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_the_inputs_and_the_statistics_stay_float32(backend):
    hidden, weight, _, labels = random_head()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        stats = wmss.logit_stats(hidden, weight, labels, backend=backend)
    truth = logit_truth(hidden.bfloat16(), weight.bfloat16(), labels)
    check_against_truth(stats, truth, torch.float32, "autocast")


def test_an_engine_without_logit_stats_falls_back_to_the_torch_engine(monkeypatch):
    """``logit_stats`` is optional in the engine contract."""
    real = logit_stats_module.engines.engine
    bare = types.SimpleNamespace(supported_dtypes=real("reference").supported_dtypes)
    monkeypatch.setattr(logit_stats_module.engines, "engine",
                        lambda name: bare if name == "reference" else real(name))
    hidden, weight, _, labels = random_head()
    got = wmss.logit_stats(hidden, weight, labels, backend="reference")
    want = wmss.logit_stats(hidden, weight, labels, backend="torch")
    for name in (*FLOAT_FIELDS, "rank"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_bad_inputs_are_named():
    hidden, weight, _, labels = random_head()
    with pytest.raises(ValueError, match="weight has hidden size"):
        wmss.logit_stats(hidden, weight[:, :5])
    with pytest.raises(ValueError, match="labels must lie in"):
        wmss.logit_stats(hidden, weight, torch.full_like(labels, 301))
    with pytest.raises(ValueError, match="labels has shape"):
        wmss.logit_stats(hidden, weight, labels[:, :4])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        wmss.logit_stats(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="bias must have shape"):
        wmss.logit_stats(hidden, weight, bias=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="softcap"):
        wmss.logit_stats(hidden, weight, softcap=-1.0)
    with pytest.raises(ValueError, match="backend"):
        wmss.logit_stats(hidden, weight, backend="fast")
    if TRITON_AVAILABLE:
        with pytest.raises(ValueError, match="hidden is torch.float64"):
            wmss.logit_stats(hidden.double(), weight.double(), backend="triton")


def test_no_gradient_flows():
    hidden = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(20, 8, device=DEVICE, requires_grad=True)
    stats = wmss.logit_stats(hidden, weight, torch.arange(5, device=DEVICE))
    assert not any(getattr(stats, name).requires_grad for name in FLOAT_FIELDS)


_PROBE = textwrap.dedent("""
    import json, resource, sys, torch, wmss
    torch.manual_seed(0)
    N, V, D, backend = 8192, 16384, 16, sys.argv[1]
    hidden, weight = torch.randn(N, D), torch.randn(V, D) * 0.5
    labels = torch.randint(0, V, (N,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = wmss.logit_stats(hidden, weight, labels, backend=backend)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(growth=after - before, margin=stats.margin.double().mean().item())))
""")
LOGITS_BYTES = 8192 * 16384 * 4  # one [N, V] float32 tensor: 512 MiB


def _peak_rss_growth(backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, backend], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_torch_backend_memory_is_a_small_fraction_of_the_logits():
    """As token_entropy's bound (wmss/loss/engines/torch_engine.py): a few [256, 2048] blocks and
    O(N) statistics, under 10% of one [N, V] float32 tensor; the same measurement sees the
    reference's materialised logits, so the bound is not vacuous."""
    fused = _peak_rss_growth("torch")
    assert fused["growth"] < 0.10 * LOGITS_BYTES, fused
    naive = _peak_rss_growth("reference")
    assert naive["growth"] > LOGITS_BYTES, naive
    assert abs(fused["margin"] - naive["margin"]) < 1e-4 * abs(naive["margin"])


def test_the_compile_gate_records_every_logit_stats_kernel():
    """The production variants launch every kernel of ``wmss_kernels.logit_stats``, with and
    without labels, bias and soft-cap (a kernel no variant reaches would go unchecked)."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent("""
        from triton.runtime.jit import JITFunction

        from wmss_kernels import compile_check as cc, logit_stats

        kernels = {name for name, value in vars(logit_stats).items()
                   if isinstance(value, JITFunction) and name.endswith("_kernel")}
        builds = [b for b in cc.record(90, cc.production_variants(["bf16"]))
                  if b.kernel in kernels]
        assert kernels == {b.kernel for b in builds}, kernels
        partials = [b.describe() for b in builds if b.kernel == "_logit_partials_kernel"]
        assert len(partials) == 8, partials  # HAS_LABELS x HAS_BIAS x HAS_SOFTCAP
        print("OK")
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


# ---- wmss inspect ----------------------------------------------------------------------------

RECORDS = [
    {"prompt": "12+30=", "completion": "42"},
    {"prompt": "What is 7*6? ", "completion": "It is 42."},
    {"text": "a b c d e f"},
    {"prompt": "9-4=", "completion": "5"},
    {"prompt": "1+1=", "completion": "2"},
]


@pytest.fixture(scope="module")
def inspect_workspace(tmp_path_factory):
    """Tiny strong and weak checkpoints (the strong one with the tokenizer), a biased one, and a
    JSONL of every record kind."""
    from wmss.recipe import toy

    root = tmp_path_factory.mktemp("inspect")
    tokenizer = toy.char_tokenizer()
    paths = {}
    for name, seed, extra in (("strong", 1, {}), ("weak", 2, {}),
                              ("capped", 3, {"final_logit_softcapping": 30.0})):
        model = toy.tiny_causal_lm(vocab_size=len(tokenizer), hidden_size=32, num_layers=1,
                                   seed=seed, initializer_range=0.5, **extra)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root, paths, str(data)


def _expected_means(paths, data, lam=0.5):
    """The means from each model's own full logits (Hugging Face forward, float64 oracle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wmss.hf import batches
    from wmss.recipe.data import load_dataset_file

    dataset = load_dataset_file(data, AutoTokenizer.from_pretrained(paths["strong"]), 64)
    logits = {name: [] for name in ("strong", "weak")}
    targets = []
    for name in logits:
        model = AutoModelForCausalLM.from_pretrained(paths[name]).eval()
        with torch.no_grad():
            for example in dataset:
                ids = torch.tensor([example["input_ids"]])
                logits[name].append(model(input_ids=ids).logits[0].double())
    for example in dataset:
        targets.append(batches.shift_labels(torch.tensor([example["labels"]]))[0])
    z = {name: torch.cat(values) for name, values in logits.items()}
    z["mix"] = lam * z["strong"] + (1 - lam) * z["weak"]
    y = torch.cat(targets)
    supervised = int((y != -100).sum())
    eye = torch.eye(z["strong"].shape[1], dtype=torch.float64)
    means = {}
    for name, values in z.items():
        truth = logit_truth(values, eye, y)  # the logits as hidden states of an identity head
        means[name] = {f: float(getattr(truth, f).double().sum()) / supervised
                       for f in (*FLOAT_FIELDS, "rank")}
    return means, supervised, len(dataset)


def test_wmss_inspect_reports_the_means_of_both_models_and_their_mixture(inspect_workspace,
                                                                         capsys):
    root, paths, data = inspect_workspace
    out = root / "stats.json"
    assert cli.main(["inspect", "--model", paths["strong"], "--weak", paths["weak"], "--data",
                     data, "--lam", "0.25", "--output", str(out), "--backend", "torch",
                     "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    for name in (*FLOAT_FIELDS, "rank", "strong", "weak", "mix"):
        assert name in printed
    report = json.loads(out.read_text())
    expected, supervised, examples = _expected_means(paths, data, lam=0.25)
    assert report["supervised_tokens"] == supervised and report["examples"] == examples
    assert report["lam"] == 0.25 and set(report["means"]) == {"strong", "weak", "mix"}
    for model, values in expected.items():
        for field, value in values.items():
            assert report["means"][model][field] == pytest.approx(value, rel=1e-5, abs=1e-5), \
                (model, field)
    # The mixture is not the mixture of the means where a field is not linear in the logits.
    assert report["means"]["mix"]["entropy"] != pytest.approx(
        0.25 * report["means"]["strong"]["entropy"] + 0.75 * report["means"]["weak"]["entropy"])


def test_wmss_inspect_of_one_model_on_every_backend(inspect_workspace, capsys):
    root, paths, data = inspect_workspace
    expected, _, _ = _expected_means(paths, data)
    for backend in ("reference", "torch", *(["triton"] if TRITON_AVAILABLE else [])):
        out = root / f"one-{backend}.json"
        assert cli.main(["inspect", "--model", paths["strong"], "--data", data, "--output",
                         str(out), "--backend", backend]) == 0
        report = json.loads(out.read_text())
        assert report["lam"] is None and list(report["means"]) == ["strong"]
        for field, value in expected["strong"].items():
            assert report["means"]["strong"][field] == pytest.approx(value, rel=1e-5, abs=1e-5)
    assert "mix" not in capsys.readouterr().out


def test_wmss_inspect_refuses_before_loading_any_model(inspect_workspace, capsys, monkeypatch):
    from wmss.commands import inspect as inspect_command

    root, paths, data = inspect_workspace
    loaded = []
    monkeypatch.setattr(inspect_command, "_load_model", lambda *a: loaded.append(a))
    existing = root / "kept.json"
    existing.write_text("precious\n")
    cases = [
        (["--output", str(existing)], "exists; pass --overwrite"),
        (["--output", str(root)], "is a directory"),
        (["--output", str(root / "missing" / "x.json")], "no such directory"),
        (["--lam", "0.3"], "--lam weighs the mixture with --weak"),
        (["--weak", paths["capped"]], "soft-caps its logits"),
        (["--weak", str(root / "nothing")], ""),
    ]
    for extra, message in cases:
        assert cli.main(["inspect", "--model", paths["strong"], "--data", data, *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("wmss inspect: error:") and message in err, (extra, err)
    bad_data = root / "bad.jsonl"
    bad_data.write_text('{"prompt": "1+1="}\n')
    assert cli.main(["inspect", "--model", paths["strong"], "--data", str(bad_data)]) == 1
    assert "bad.jsonl:1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--model", paths["strong"], "--data", data, "--lam", "1.5"])
    assert loaded == [] and existing.read_text() == "precious\n"


def test_wmss_inspect_overwrites_only_when_asked(inspect_workspace, capsys):
    root, paths, data = inspect_workspace
    out = root / "again.json"
    out.write_text("{}\n")
    assert cli.main(["inspect", "--model", paths["strong"], "--data", data, "--output", str(out),
                     "--backend", "torch", "--overwrite"]) == 0
    assert json.loads(out.read_text())["means"]["strong"]["entropy"] > 0


def test_inspect_models_refuses_soft_capped_heads_for_the_mixture(inspect_workspace):
    from transformers import AutoModelForCausalLM

    from wmss.recipe.inspect import inspect_models

    _, paths, _ = inspect_workspace
    strong = AutoModelForCausalLM.from_pretrained(paths["strong"])
    capped = AutoModelForCausalLM.from_pretrained(paths["capped"])
    dataset = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]
    with pytest.raises(ValueError, match="weak model soft-caps its logits"):
        inspect_models(strong, dataset, weak_model=capped)
    with pytest.raises(ValueError, match="lam must"):
        inspect_models(strong, dataset, weak_model=strong, lam=2.0)
    with pytest.raises(TypeError, match="weak_model must be a torch.nn.Module"):
        inspect_models(strong, dataset, weak_model="weak")
    alone = inspect_models(capped, dataset, backend="torch")  # one capped model is fine
    assert alone["supervised_tokens"] == 2 and alone["means"]["strong"]["entropy"] > 0
