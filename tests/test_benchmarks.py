"""``wmss bench``: the quick CPU sweep end to end, the correctness rule, the input modes, the
interleaved CPU timing, the CSV and the report."""

import argparse
import csv
import importlib.util
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import DEVICE, TRITON_AVAILABLE

from wmss.commands import main
from wmss.commands.bench import load_benchmarks

load_benchmarks()  # puts the checkout's benchmarks package on the path, as `wmss bench` does

from benchmarks import csvio, measure, report, run  # noqa: E402
from benchmarks.check import check, reference  # noqa: E402
from benchmarks.inputs import make_inputs  # noqa: E402
from benchmarks.measure import interleaved_order, quantiles, time_cpu_interleaved  # noqa: E402
from benchmarks.providers import LEAVES, PROVIDERS, Naive, Problem, Step  # noqa: E402
from benchmarks.run import Recorder, run_group  # noqa: E402
from benchmarks.shapes import ERROR_FACTOR, LOGIT_SCALE, QUICK_SHAPES, HeadShape  # noqa: E402

# The columns the benchmark issue specifies, in its order.
COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
           "config", "device", "timestamp", "version"]
CPU_PROVIDERS = ("naive", "torch_compile", "gemm_floor", "wmss_torch")
GPU_ONLY = ("liger_concat", "cce_concat", "wmss_triton", "wmss_triton_cublas")
MODES = {"fused_loss": ("forward", "backward", "full"), "token_entropy": ("forward",)}
CPU = torch.device("cpu")
TINY = QUICK_SHAPES["tiny-pair"]
QUICK_TOKENS = (256, 512)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`wmss bench --quick` exactly as CI's criterion states it (on the CPU even where CUDA is)."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--quick", "--device", "cpu", "--out", str(out)])
    with (out / "cpu.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return code, out, reader.fieldnames, rows


def _ok(rows, kernel, provider, mode, metric):
    return [r for r in rows if (r["kernel"], r["provider"], r["mode"], r["metric"]) ==
            (kernel, provider, mode, metric) and json.loads(r["config"])["status"] == "ok"]


@pytest.mark.slow
def test_quick_sweep_writes_every_cpu_provider(quick_run):
    code, out, header, rows = quick_run
    assert code == 0
    assert header == COLUMNS
    for kernel, modes in MODES.items():
        for provider in CPU_PROVIDERS:
            for mode in modes:
                speeds = _ok(rows, kernel, provider, mode, "speed")
                assert tuple(int(r["x_value"]) for r in speeds) == QUICK_TOKENS
                for speed in speeds:
                    p50, p20, p80 = (float(speed[k]) for k in ("p50", "p20", "p80"))
                    assert 0 < p20 <= p50 <= p80, speed
                    assert speed["unit"] == "ms" and speed["x_name"] == "tokens"
                    assert speed["device"] == "cpu"
                    config = json.loads(speed["config"])
                    assert config["shape"] == "tiny-pair" and config["dtype"] == "float32"
                    assert config["inputs"] == "gaussian"  # the default mode
                    assert (config["d_s"], config["d_w"], config["V"]) == (128, 96, 4096)
                memory = _ok(rows, kernel, provider, mode, "memory")
                if provider == "gemm_floor":
                    assert not memory  # the floor has no memory figure
                else:
                    assert len(memory) == len(QUICK_TOKENS)
                    assert all(r["unit"] == "MB" and float(r["p50"]) >= 0 for r in memory)
    # The GPU-only providers are reported, with the reason, and have no figures.
    for provider in GPU_ONLY:
        reported = [r for r in rows if r["provider"] == provider and r["kernel"] == "fused_loss"]
        assert reported and all(r["p50"] == "" for r in reported)
        assert {json.loads(r["config"])["status"] for r in reported} == {"unsupported"}
    assert all(r["version"].startswith("0.") and r["timestamp"].endswith("Z") for r in rows)


@pytest.mark.slow
def test_every_checked_row_records_its_error_beside_the_plain_formulas(quick_run):
    _, _, _, rows = quick_run
    outputs = {"fused_loss": {"loss", *LEAVES}, "token_entropy": {"entropy"}}
    for row in rows:
        config = json.loads(row["config"])
        if config["status"] != "ok" or row["provider"] == "gemm_floor":
            assert "check" not in config  # unsupported, or nothing to check
            continue
        checked = config["check"]
        assert set(checked["error"]) == set(checked["plain_error"]) == outputs[row["kernel"]]
        assert checked["factor"] == ERROR_FACTOR and checked["tokens"] == 128
        for name, error in checked["error"].items():
            assert error <= checked["factor"] * checked["plain_error"][name] + checked["floor"]
        if row["provider"] == "naive":  # the plain formula itself
            assert checked["error"] == checked["plain_error"]


@pytest.mark.slow
def test_quick_sweep_draws_plots_and_writes_the_report(quick_run):
    _, out, _, rows = quick_run
    for kernel in MODES:
        png = out / f"cpu-{kernel}-tiny-pair-float32.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "cpu.md").read_text()
    assert "CPU figures" in text and "### fused_loss, backward" in text
    assert "## Correctness check" in text
    checks = next(line for line in text.splitlines()
                  if line.startswith("| tiny-pair | float32 | gaussian | wmss_torch | ok |"))
    assert " / " in checks  # each output: the provider's error / the plain formula's
    summary = report.summary_markdown(rows)
    line = next(r for r in summary.splitlines()
                if r.startswith("| tiny-pair | float32 | gaussian | 512 |"))
    assert " ms · " in line and line.count("x") >= 2  # figures and ratios


class WrongLoss(Naive):
    name = "wrong_loss"

    def loss(self, problem, inputs):
        return super().loss(problem, inputs) * 1.01


class NoWeakHiddenGradient(Naive):
    name = "no_weak_hidden_gradient"

    def loss(self, problem, inputs):
        return super().loss(problem, {**inputs, "weak_hidden": inputs["weak_hidden"].detach()})


class FloatUpcast(Naive):
    """The plain formula on float32 copies of the inputs: its gradients reach bf16 leaves rounded
    to bf16 once, so its error is bf16 rounding, no more."""

    name = "float_upcast"

    def loss(self, problem, inputs):
        return super().loss(problem, {k: t.float() if k in LEAVES else t
                                      for k, t in inputs.items()})


class NoisyHiddenGradient(Naive):
    """The plain formula with noise added to the strong hidden-state gradient: a relative error
    of ``times`` the plain formula's own error on it (``plain_error``)."""

    name = "noisy_hidden_gradient"

    def __init__(self, times: float, plain_error: float):
        self.times, self.plain_error = times, plain_error

    def loss(self, problem, inputs):
        hidden = inputs["strong_hidden"] * 1  # a non-leaf to hook, so the input is untouched
        hidden.register_hook(self._perturb)
        return super().loss(problem, {**inputs, "strong_hidden": hidden})

    def _perturb(self, grad):
        noise = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1))
        noise *= self.times * self.plain_error * grad.float().norm() / noise.norm()
        return (grad.float() + noise).to(grad.dtype)


def test_check_catches_a_wrong_loss_and_a_missing_gradient():
    problem = Problem("fused_loss", TINY, torch.float32, 64, CPU)
    inputs = make_inputs(problem, seed=0)
    assert check(Naive(), problem, inputs).ok
    wrong = check(WrongLoss(), problem, inputs)
    assert wrong.failed == ["loss", *LEAVES]  # 1% on the loss is 1% on every gradient
    assert wrong.outputs["loss"].error == pytest.approx(0.01, rel=1e-3)
    missing = check(NoWeakHiddenGradient(), problem, inputs)
    assert not missing.ok and missing.failed == ["weak_hidden"]
    assert missing.outputs["weak_hidden"].error == float("inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("inputs_mode", ["gaussian", "realistic"])
def test_the_rule_accepts_rounding_like_the_plain_formula_and_rejects_ten_times_worse(
        dtype, inputs_mode):
    """One rule for every dtype: an error of the plain formula's order passes (bf16 rounding in
    bf16, float32 rounding in float32); ten times the plain formula's error fails, on exactly
    the output that has it."""
    problem = Problem("fused_loss", TINY, dtype, 64, CPU, inputs=inputs_mode)
    inputs = make_inputs(problem, seed=0)
    ref = reference(problem, inputs)
    plain = ref.plain_errors["strong_hidden"]
    assert (1e-4 < plain < 1e-2) if dtype == torch.bfloat16 else (plain < 1e-5)

    rounded = check(FloatUpcast(), problem, inputs, ref)
    assert rounded.ok, rounded.summary()
    as_noisy_as_plain = check(NoisyHiddenGradient(1.0, plain), problem, inputs, ref)
    assert as_noisy_as_plain.ok, as_noisy_as_plain.summary()

    ten_times = check(NoisyHiddenGradient(10.0, plain), problem, inputs, ref)
    assert ten_times.failed == ["strong_hidden"], ten_times.summary()
    judged = ten_times.outputs["strong_hidden"]
    assert judged.plain == plain and judged.error > ERROR_FACTOR * plain
    assert "MISMATCH in strong_hidden" in ten_times.summary()
    assert f"strong_hidden {judged.error:.1e} (plain {plain:.1e})" in ten_times.summary()


def test_the_rule_has_a_floor_for_outputs_that_are_exact():
    """Two exact results (error 0 against 0) pass; a tiny float32-level error on an output the
    plain formula gets exactly right is not an infinite ratio."""
    from benchmarks.check import OutputError

    assert OutputError(0.0, 0.0).ok
    assert OutputError(1e-7, 0.0).ok
    assert not OutputError(1e-3, 0.0).ok


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel missing")
@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [
    torch.float32,
    # Triton's interpreter converts float32 to bf16 by truncation (a GPU rounds to nearest; see
    # wmss_kernels.config.round_bf16_by_hand), which doubles Liger's rounding error: judged on CUDA.
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE.type != "cuda", reason="the interpreter truncates bf16 stores")),
], ids=str)
def test_liger_on_the_concatenated_inputs_gives_the_mixed_loss_and_gradients(dtype):
    """The concatenation trick and the gradients mapped back to the four leaves, within the rule
    (on a CPU, Liger's Triton kernel runs under the interpreter)."""
    problem = Problem("fused_loss", TINY, dtype, 32, DEVICE)
    result = check(PROVIDERS["liger_concat"], problem, make_inputs(problem, seed=0))
    assert result.ok, result.summary()


def test_a_provider_that_disagrees_is_reported_with_both_errors_and_not_timed():
    log = []
    rows = run_group([WrongLoss()], "fused_loss", TINY, torch.float32, (64, 128),
                     MODES["fused_loss"], CPU, Recorder(CPU), log.append)
    assert [r["mode"] for r in rows] == list(MODES["fused_loss"])
    for row in rows:
        config = json.loads(row["config"])
        assert config["status"] == "mismatch" and "loss 1.0e-02 (plain " in config["detail"]
        assert config["check"]["error"]["loss"] == pytest.approx(0.01, rel=1e-2)
        assert 0 < config["check"]["plain_error"]["loss"] < 1e-6
        assert row["p50"] == row["p20"] == row["p80"] == "" and row["x_value"] == ""
    assert any("MISMATCH in loss" in line for line in log)
    assert not any(" ms " in line for line in log)  # nothing was timed
    markdown = report.full_markdown(rows)
    assert "mismatch" in markdown
    line = next(r for r in markdown.splitlines() if "| wrong_loss | mismatch |" in r)
    assert "| 1.0e-02 / " in line  # the loss: its error / the plain formula's


# ---- input modes --------------------------------------------------------------------------------

def _strong_distribution_stats(inputs: dict) -> dict:
    """Mean entropy (nats), fraction of tokens whose top probability is above 0.5, mean loss."""
    with torch.no_grad():
        log_p = (inputs["strong_hidden"] @ inputs["strong_weight"].T).float().log_softmax(-1)
        p = log_p.exp()
        loss = -log_p.gather(1, inputs["labels"][:, None])
    return {"entropy": float(-(p * log_p).sum(-1).mean()),
            "peaked": float((p.max(-1).values > 0.5).float().mean()),
            "loss": float(loss.mean())}


@pytest.mark.parametrize("seed", [0, 1])
def test_realistic_inputs_are_peaked_and_heavy_tailed_like_a_trained_lm(seed):
    problem = Problem("fused_loss", TINY, torch.float32, 512, CPU, inputs="realistic")
    stats = _strong_distribution_stats(make_inputs(problem, seed))
    assert 1.0 <= stats["entropy"] <= 3.0, stats
    assert stats["peaked"] >= 0.6, stats
    assert 1.0 <= stats["loss"] <= 4.0, stats
    # Zipf label frequencies: a few tokens are most of the labels (uniform: 10 of 4096 ~ 0.2%).
    labels = make_inputs(problem, seed)["labels"]
    top_ten = labels.bincount(minlength=TINY.vocab).sort(descending=True).values[:10].sum()
    assert top_ten / labels.numel() > 0.2
    # The Gaussian mode, for contrast: broad distributions (entropy ~ log V - sigma^2 / 2 for
    # logits of std sigma), almost never peaked.
    gaussian = _strong_distribution_stats(make_inputs(
        Problem("fused_loss", TINY, torch.float32, 512, CPU, inputs="gaussian"), seed))
    assert gaussian["entropy"] > math.log(TINY.vocab) - LOGIT_SCALE ** 2 / 2 - 0.5, gaussian
    assert gaussian["peaked"] < 0.1, gaussian


def test_realistic_inputs_are_deterministic_and_the_same_for_every_provider():
    problem = Problem("fused_loss", TINY, torch.bfloat16, 64, CPU, inputs="realistic")
    first, again, other = (make_inputs(problem, seed) for seed in (0, 0, 1))
    assert first.keys() == {"labels", *LEAVES}
    for name in first:
        assert torch.equal(first[name], again[name]), name
        assert not torch.equal(first[name], other[name]), name
        if name != "labels":
            assert first[name].dtype == torch.bfloat16 and first[name].requires_grad
    entropy = make_inputs(replace(problem, kernel="token_entropy"), 0)
    assert entropy.keys() == {"strong_hidden", "strong_weight", "labels"}


def test_realistic_inputs_build_nothing_the_size_of_tokens_by_vocabulary():
    """Cheap at the real vocabulary: O(V d + N d), never [N, V] (here 2.5 GB in float32)."""
    if not measure._reset_peak_rss():
        pytest.skip("needs Linux /proc/self/clear_refs")
    shape = HeadShape("wide-vocab", 16, 16, 151936)
    problem = Problem("fused_loss", shape, torch.float32, 4096, CPU, inputs="realistic")
    before_kb = measure._status_kb("VmRSS")
    inputs = make_inputs(problem, 0)
    growth = (measure._status_kb("VmHWM") - before_kb) * 1024
    n_by_v = problem.tokens * shape.vocab * 4
    assert growth < n_by_v / 8, (growth, n_by_v)
    assert inputs["strong_weight"].shape == (151936, 16)


def test_a_sweep_in_the_realistic_mode_records_it():
    rows = run_group([PROVIDERS["naive"]], "token_entropy", TINY, torch.float32, (64,),
                     ("forward",), CPU, Recorder(CPU), lambda line: None, inputs="realistic")
    assert rows and all(json.loads(r["config"])["inputs"] == "realistic" for r in rows)
    line = next(r for r in report.full_markdown(rows).splitlines()
                if r.startswith("| tiny-pair | float32 | realistic | 64 |"))
    assert " ms · " in line


def test_python_m_benchmarks_takes_inputs_and_rejects_unknown_modes():
    from wmss.commands.bench import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run.add_arguments(parser)
    run.add_arguments(parser)  # a parser that declares --inputs already is left as it is
    args = parser.parse_args(["--quick", "--device", "cpu", "--inputs", "gaussian", "realistic"])
    assert run.resolve_options(args).inputs == ("gaussian", "realistic")
    assert run.resolve_options(parser.parse_args(["--quick", "--device", "cpu"])).inputs == (
        "gaussian",)
    with pytest.raises(run.UsageError, match="unknown inputs 'nope'"):
        run.resolve_options(parser.parse_args(["--quick", "--device", "cpu", "--inputs", "nope"]))


# ---- CPU timing: interleaved providers ----------------------------------------------------------

def test_cpu_timing_interleaves_the_providers_within_each_repetition():
    assert interleaved_order(["A", "B", "C"], 2) == ["A", "B", "C", "A", "B", "C"]
    calls = []

    def recording(name):
        return Step(run=lambda: calls.append(name))

    times = time_cpu_interleaved({n: recording(n) for n in "ABC"}, repeats=3, warmup=1)
    assert "".join(calls) == "ABC" * 4  # one warm-up round, then three timed ones
    assert set(times) == set("ABC") and all(len(t) == 3 and t[0] >= 0 for t in times.values())


def test_a_provider_that_fails_mid_timing_leaves_the_others_timed():
    calls = []

    def failing():
        calls.append("B")
        if calls.count("B") == 2:
            raise RuntimeError("broke on its second call")

    steps = {"A": Step(run=lambda: calls.append("A")), "B": Step(run=failing),
             "C": Step(run=lambda: calls.append("C"))}
    times = time_cpu_interleaved(steps, repeats=3, warmup=0)
    assert "".join(calls) == "ABC" + "ABC" + "AC"  # B raised in round two, then left out
    assert isinstance(times["B"], RuntimeError)
    assert len(times["A"]) == len(times["C"]) == 3


def _row(provider, metric, value, x=4096, mode="full"):
    config = json.dumps({"shape": "qwen3-4b", "dtype": "bfloat16", "status": "ok"})
    return dict(kernel="fused_loss", provider=provider, mode=mode, metric=metric,
                unit="ms" if metric == "speed" else "MB", x_name="tokens", x_value=str(x),
                p50=str(value), p20=str(value), p80=str(value), config=config,
                device="nvidia-h100", timestamp="2026-01-01T00:00:00Z", version="0.1.0")


def test_report_ratios_against_best_peer_and_floor():
    rows = [_row("naive", "speed", 10), _row("naive", "memory", 100),
            _row("liger_concat", "speed", 5), _row("liger_concat", "memory", 50),
            _row("torch_compile", "speed", 8), _row("torch_compile", "memory", 40),
            _row("gemm_floor", "speed", 2),
            _row("wmss_triton", "speed", 4), _row("wmss_triton", "memory", 10)]
    line = next(r for r in report.summary_markdown(rows).splitlines()
                if r.startswith("| qwen3-4b"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-3:] == ["0.80x (liger_concat)", "0.25x (torch_compile)", "2.00x"]
    assert "4 ms · 10 MB" in cells


def test_targets_give_each_ratio_and_verdict_on_the_default_backend():
    """The GPU issue's targets, from one run's rows (qwen3-4b bf16: 16384 x 2 x 2560 + 151936 x
    2 x 2560 gradient elements, 1563.8 MB in bf16)."""
    gradients = (16384 + 151936) * 2 * 2560 * 2 / 2**20
    rows = [_row("gemm_floor", "speed", 100, x=16384), _row("liger_concat", "speed", 130, x=16384),
            _row("wmss_triton", "speed", 140, x=16384),
            _row("wmss_triton", "memory", 1.05 * gradients, x=16384),
            _row("wmss_stats", "speed", 146, x=16384),  # 1.043: missed
            _row("wmss_frozen_weak", "speed", 100, x=16384),  # 0.714: met
            _row("wmss_native", "speed", 1, x=16384),  # a CPU provider: not the GPU's default
            {**_row("gemm_floor", "speed", 10, x=16384, mode="forward"),
             "kernel": "token_entropy"},
            {**_row("wmss_triton", "speed", 13.5, x=16384, mode="forward"),
             "kernel": "token_entropy"}]
    assert report.gradient_mb("qwen3-4b", "bfloat16", 16384) == pytest.approx(gradients)
    text = report.summary_markdown(rows)
    header, _, line = [r for r in text.split("**Targets**")[1].splitlines() if r.startswith("|")]
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")],
                     [c.strip() for c in line.strip("|").split("|")]))
    assert cells == {"shape": "qwen3-4b", "dtype": "bfloat16", "inputs": "gaussian",
                     "tokens": "16384", "full step / gemm_floor (≤ 1.5)": "1.40 met",
                     "full step / liger_concat (≤ 1)": "1.08 missed",
                     "peak memory / gradients (≤ 1.1)": "1.05 met",
                     "return_stats / plain (≤ 1.03)": "1.04 missed",
                     "frozen weak / full step (≤ 0.75)": "0.71 met",
                     "token_entropy / one product (≤ 1.3)": "1.35 missed"}
    # On a CPU the default backend is the native engine, in the targets and the ratios alike.
    cpu_rows = [{**r, "device": "cpu", "provider": r["provider"].replace("triton", "native")}
                for r in rows if r["provider"] != "wmss_native"]
    cpu_text = report.summary_markdown(cpu_rows)
    assert "1.40 met" in cpu_text and "wmss_native / gemm_floor" in cpu_text


def _option_inputs(problem):
    inputs = make_inputs(problem, seed=0)
    return inputs, [PROVIDERS[name] for name in ("wmss_stats", "wmss_frozen_weak")]


def test_frozen_weak_trains_the_strong_model_only_and_is_checked_on_it():
    problem = Problem("fused_loss", TINY, torch.float32, 64, CPU)
    inputs, (_, frozen) = _option_inputs(problem)
    step = frozen.make_step(problem, inputs, "full")
    step.run()
    assert inputs["strong_hidden"].grad is not None and inputs["strong_weight"].grad is not None
    assert inputs["weak_hidden"].grad is None and inputs["weak_weight"].grad is None
    result = check(frozen, problem, inputs)
    assert result.ok and set(result.outputs) == {"loss", "strong_hidden", "strong_weight"}


def test_the_stats_provider_asks_for_the_statistics_and_returns_the_plain_loss(monkeypatch):
    import wmss

    problem = Problem("fused_loss", TINY, torch.float32, 64, CPU)
    inputs, (stats, _) = _option_inputs(problem)
    calls = []
    fused_loss = wmss.fused_loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return fused_loss(*args, **kwargs)

    monkeypatch.setattr(wmss, "fused_loss", spy)
    got = stats.loss(problem, inputs)
    assert [c.get("return_stats") for c in calls] == [True]
    assert calls[0]["backend"] == PROVIDERS["wmss_native"].backend
    expected = PROVIDERS["wmss_native"].loss(problem, inputs)
    assert got.shape == () and torch.equal(got, expected)


def test_the_option_providers_are_measured_beside_the_plain_call():
    providers = [PROVIDERS[name] for name in ("wmss_native", "wmss_stats", "wmss_frozen_weak")]
    rows = run_group(providers, "fused_loss", TINY, torch.float32, (64,), ("full",), CPU,
                     Recorder(CPU), lambda line: None)
    if providers[0].unsupported(Problem("fused_loss", TINY, torch.float32, 64, CPU)):
        assert {json.loads(r["config"])["status"] for r in rows} == {"unsupported"}
        return
    speeds = {r["provider"]: r for r in rows if r["metric"] == "speed"}
    assert set(speeds) == {p.name for p in providers}
    assert all(json.loads(r["config"])["status"] == "ok" and float(r["p50"]) > 0
               for r in speeds.values())
    checked = json.loads(speeds["wmss_frozen_weak"]["config"])["check"]["error"]
    assert set(checked) == {"loss", "strong_hidden", "strong_weight"}
    line = next(r for r in report.summary_markdown(rows).split("**Targets**")[1].splitlines()
                if r.startswith("| tiny-pair"))
    assert line.count(" met") + line.count(" missed") == 3  # memory, stats, frozen weak


def test_csv_appends_atomically_and_report_uses_the_latest_run(tmp_path):
    path = tmp_path / "dev.csv"
    old = _row("naive", "speed", 10)
    new = {**_row("naive", "speed", 7), "timestamp": "2026-02-01T00:00:00Z"}
    csvio.append_rows(path, [old])
    csvio.append_rows(path, [new])
    rows = csvio.read_rows(path)
    assert [r["p50"] for r in rows] == ["10", "7"]
    assert path.read_text().count("kernel,provider") == 1
    assert [r["p50"] for r in csvio.latest_rows(rows)] == ["7"]
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_each_input_mode_keeps_its_own_latest_run_and_old_rows_are_gaussian():
    old = _row("naive", "speed", 10)  # written before input modes: no "inputs" in its config
    realistic = {**_row("naive", "speed", 12), "timestamp": "2026-02-01T00:00:00Z",
                 "config": json.dumps({"shape": "qwen3-4b", "dtype": "bfloat16",
                                       "inputs": "realistic", "status": "ok"})}
    assert csvio.latest_rows([old, realistic]) == [old, realistic]
    lines = report.full_markdown([old, realistic]).splitlines()
    assert any(r.startswith("| qwen3-4b | bfloat16 | gaussian | 4096 | 10 ms") for r in lines)
    assert any(r.startswith("| qwen3-4b | bfloat16 | realistic | 4096 | 12 ms") for r in lines)


def test_quantiles_interpolate_linearly():
    assert quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((3.0, 1.8, 4.2))


def test_bench_rejects_unknown_names_and_a_full_sweep_on_cpu(capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--providers", "nope"]) == 2
    assert "unknown provider 'nope'" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_bench_help_names_every_provider_and_shape():
    """The help lists the choices by hand (the command does not import the benchmarks to
    parse its arguments), so a new provider or shape must be added there too."""
    from benchmarks.shapes import ALL_SHAPES

    from wmss.commands.bench import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {action.dest: action.help for action in parser._actions}
    listed = lambda text: {name.strip(" ,") for name in text.split("(")[0].split()}
    assert listed(helps["providers"]) == set(PROVIDERS)
    assert listed(helps["shapes"]) == set(ALL_SHAPES)


def test_every_provider_is_drawn_with_a_marker():
    """A run at a single token count (the CPU engine's target shape) draws no line segments, so
    a provider styled without a marker, the floor once, would be missing from its plot."""
    from benchmarks.plot import STYLE

    assert set(STYLE) == set(PROVIDERS)
    assert all(style.get("marker") for style in STYLE.values()), STYLE
