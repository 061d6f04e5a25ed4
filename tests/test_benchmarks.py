"""``wmss bench``: the quick CPU sweep end to end, the correctness gate, the CSV and the report."""

import csv
import importlib.util
import json

import pytest
import torch
from conftest import DEVICE, TRITON_AVAILABLE

from wmss.cli import main
from wmss.commands.bench import load_benchmarks

load_benchmarks()  # puts the checkout's benchmarks package on the path, as `wmss bench` does

from benchmarks import csvio, report  # noqa: E402
from benchmarks.check import check  # noqa: E402
from benchmarks.measure import quantiles  # noqa: E402
from benchmarks.providers import PROVIDERS, Naive, Problem, make_inputs  # noqa: E402
from benchmarks.run import Recorder, run_group  # noqa: E402
from benchmarks.shapes import QUICK_SHAPES  # noqa: E402

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


def test_quick_sweep_draws_plots_and_writes_the_report(quick_run):
    _, out, _, rows = quick_run
    for kernel in MODES:
        png = out / f"cpu-{kernel}-tiny-pair-float32.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "cpu.md").read_text()
    assert "CPU figures" in text and "### fused_loss, backward" in text
    summary = report.summary_markdown(rows)
    line = next(r for r in summary.splitlines() if r.startswith("| tiny-pair | float32 | 512 |"))
    assert " ms · " in line and line.count("x") >= 2  # figures and ratios


class WrongLoss(Naive):
    name = "wrong_loss"

    def loss(self, problem, inputs):
        return super().loss(problem, inputs) * 1.01


class NoWeakHiddenGradient(Naive):
    name = "no_weak_hidden_gradient"

    def loss(self, problem, inputs):
        return super().loss(problem, {**inputs, "weak_hidden": inputs["weak_hidden"].detach()})


def test_check_catches_a_wrong_loss_and_a_missing_gradient():
    problem = Problem("fused_loss", TINY, torch.float32, 64, CPU)
    inputs = make_inputs(problem, seed=0)
    assert check(Naive(), problem, inputs).ok
    wrong = check(WrongLoss(), problem, inputs)
    assert not wrong.ok and wrong.errors["loss"] == pytest.approx(0.01, rel=1e-3)
    missing = check(NoWeakHiddenGradient(), problem, inputs)
    assert not missing.ok and missing.errors["weak_hidden"] == float("inf")
    assert missing.errors["strong_weight"] < 1e-4  # the rest is right


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel missing")
@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_liger_on_the_concatenated_inputs_gives_the_mixed_loss_and_gradients(dtype):
    """The concatenation trick and the gradients mapped back to the four leaves (on a CPU, Liger's
    Triton kernel runs under the interpreter)."""
    problem = Problem("fused_loss", TINY, dtype, 32, DEVICE)
    result = check(PROVIDERS["liger_concat"], problem, make_inputs(problem, seed=0))
    assert result.ok, result.summary()


def test_a_provider_that_disagrees_is_reported_and_not_timed():
    log = []
    rows = run_group(WrongLoss(), "fused_loss", TINY, torch.float32, (64, 128), MODES["fused_loss"],
                     CPU, Recorder(CPU), log.append)
    assert [r["mode"] for r in rows] == list(MODES["fused_loss"])
    for row in rows:
        config = json.loads(row["config"])
        assert config["status"] == "mismatch" and "loss 1.0e-02" in config["detail"]
        assert row["p50"] == row["p20"] == row["p80"] == "" and row["x_value"] == ""
    assert any("MISMATCH" in line for line in log)
    assert not any(" ms " in line for line in log)  # nothing was timed
    assert "mismatch" in report.full_markdown(rows)


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


def test_quantiles_interpolate_linearly():
    assert quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((3.0, 1.8, 4.2))


def test_bench_rejects_unknown_names_and_a_full_sweep_on_cpu(capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--providers", "nope"]) == 2
    assert "unknown provider 'nope'" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
