"""``benchmarks/gpu_session.sh``, the GPU issue's one call of the device tool. No GPU here, so: its
device run's command lines, recorded by stand-ins for python and ncu, are checked against the
parsers they reach; and a dry run runs every stage at a tiny size on the CPU, one of them past its
limit, which is stopped while the later ones still run."""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from wmss.commands.bench import add_arguments as add_bench_arguments
from wmss.commands.bench import load_benchmarks

load_benchmarks()

from benchmarks import csvio, profile_step, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0+gdeadbee"
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
# A stand-in for python and ncu: records its arguments (and the logit source) one call per line,
# in one write (the two pytest sessions start at once).
RECORDER = """#!/usr/bin/env bash
line=$(printf '%q ' "$(basename "$0")" "$@")
printf '%s\\t%s\\n' "$WMSS_LOGIT_SOURCE" "$line" >> "$RECORD"
"""


def _session(tmp_path, *args, python=sys.executable, path=None, record=None, version=None,
             **limits):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python),
           **{f"{stage.upper()}_LIMIT": str(limit) for stage, limit in limits.items()}}
    env.pop(run.VERSION_VARIABLE, None)
    if version is not None:  # as --prepare records it
        (tmp_path / "VERSION").write_text(version + "\n")
        env["SESSION_VERSION_FILE"] = str(tmp_path / "VERSION")
    if record is not None:
        env["RECORD"] = str(record)
    env.pop("WMSS_LOGIT_SOURCE", None)
    if path is not None:
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=600)
    log_path = tmp_path / "out" / "session.log"
    return done, log_path.read_text() if log_path.exists() else ""


def _stage_status(log: str, stage: str) -> int:
    return int(re.search(rf"^== {stage}: exit status (\d+) after \d+ s", log, re.M).group(1))


def test_the_device_run_names_files_providers_and_options_that_exist(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "ncu"):
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record"
    done, log = _session(tmp_path, python=bin_dir / "python", path=bin_dir, record=record,
                         version=VERSION)
    assert done.returncode == 0 and "== every stage passed" in log, log
    calls = [(line.split("\t")[0], shlex.split(line.split("\t")[1]))
             for line in record.read_text().splitlines()]
    pytest_calls = [(source, argv) for source, argv in calls if argv[1:3] == ["-m", "pytest"]]
    assert sorted(source for source, _ in pytest_calls) == ["cublas", "triton"]
    for _, argv in pytest_calls:
        files = [a for a in argv if a.startswith("tests/")]
        assert files and all((ROOT / f).is_file() for f in files), files
        assert "-n" in argv and "--timeout" in argv  # pytest-xdist, pytest-timeout: in the image

    benches = [argv for _, argv in calls if argv[1:3] == ["-m", "benchmarks"]]
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    run.add_arguments(parser)
    sweeps = []
    for argv in benches:
        args = parser.parse_args(argv[3:])
        assert args.device is None  # cuda there; resolved here on the CPU, which checks every name
        sweeps.append(run.resolve_options(argparse.Namespace(**{**vars(args), "device": "cpu"})))
    entropy, loss = sweeps  # the quick kernel first, before a limit can cut in
    assert entropy.kernels == ("token_entropy",) and entropy.shapes == ("qwen3-4b",)
    assert loss.kernels == ("fused_loss",) and set(loss.shapes) == {"qwen3-4b", "qwen3-4b-1.7b"}
    assert {"liger_concat", "cce_concat", "gemm_floor", "wmss_triton", "wmss_stats",
            "wmss_frozen_weak"} <= set(loss.providers)
    assert all(s.tokens == (4096, 8192, 16384) and s.dtypes == ("bfloat16",) for s in sweeps)
    assert len({str(s.out) for s in sweeps}) == 1  # one CSV

    ncu = next(argv for _, argv in calls if argv[0] == "ncu")
    step = ncu[ncu.index("-m") + 1:]
    assert step[0] == "benchmarks.profile_step"
    profiled = profile_step._parse_args(step[1:])
    assert (profiled.shape, profiled.tokens) == ("qwen3-4b", 4096)
    # Collection starts at cudaProfilerStart (profile_step), not at an NVTX range.
    assert ncu[ncu.index("--profile-from-start") + 1] == "off"
    kernels = re.compile(ncu[ncu.index("--kernel-name") + 1].removeprefix("regex:"))
    for name in triton_kernels():
        assert kernels.search(name), name
    for name in ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "sm90_xmma_gemm_bf16bf16_bf16f32"):
        assert kernels.search(name), name  # cuBLAS's products
    for name in ("vectorized_elementwise_kernel", "reduce_kernel", "index_elementwise_kernel"):
        assert not kernels.search(name), name  # PyTorch's own small kernels
    assert f"wmss {VERSION}" in log  # the version --prepare records, in place of git's


def triton_kernels() -> list[str]:
    """The names of every ``@triton.jit`` kernel of ``wmss_kernels`` (launched ones end in
    ``_kernel``)."""
    names = []
    for path in (ROOT / "wmss_kernels").glob("*.py"):
        names += re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text())
    assert len(names) >= 8, names
    return names


@pytest.mark.slow
def test_the_dry_run_stops_a_stage_at_its_limit_passes_the_rest_and_packs_the_results(tmp_path):
    """One dry run (~20 s) for both: the setup stage (importing torch takes seconds) gets a
    1-second limit, so it is stopped, and the tests, the benchmark and the profile still run."""
    done, log = _session(tmp_path, "--dry-run", setup=1, version=VERSION)
    assert done.returncode == 1, log
    assert _stage_status(log, "setup") == 124 and "(stopped at its limit)" in log
    assert [_stage_status(log, stage) for stage in ("tests", "bench", "profile")] == [0, 0, 0]
    assert "== failed stages: setup" in log
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        tar.extractall(tmp_path / "results", filter="data")
    results = tmp_path / "results"
    for source in ("triton", "cublas"):
        suite = ElementTree.parse(results / f"tests-{source}.xml").getroot().find("testsuite")
        assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (
            "1", "0", "0")
    rows = csvio.read_rows(results / "bench" / "cpu.csv")
    assert {r["provider"] for r in rows} == {"gemm_floor", "wmss_native", "wmss_stats",
                                             "wmss_frozen_weak"}
    assert {r["version"] for r in rows} == {VERSION}  # what --prepare recorded, not git's
    assert "**Targets**" in (results / "bench" / "cpu.md").read_text()
    assert not any(p.name.startswith("pytest-") for p in results.iterdir())


def test_an_unknown_option_prints_the_usage(tmp_path):
    done, _ = _session(tmp_path, "--nope")
    assert done.returncode == 2 and "usage: bash benchmarks/gpu_session.sh" in done.stderr
