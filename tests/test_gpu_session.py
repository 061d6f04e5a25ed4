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
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
# A stand-in for python and ncu: records its arguments (and the logit source) one call per line,
# in one write (the two pytest sessions start at once).
RECORDER = """#!/usr/bin/env bash
line=$(printf '%q ' "$(basename "$0")" "$@")
printf '%s\\t%s\\n' "$WMSS_LOGIT_SOURCE" "$line" >> "$RECORD"
"""


def _session(tmp_path, *args, python=sys.executable, path=None, record=None, **limits):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python),
           **{f"{stage.upper()}_LIMIT": str(limit) for stage, limit in limits.items()}}
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
    done, log = _session(tmp_path, python=bin_dir / "python", path=bin_dir, record=record)
    assert done.returncode == 0 and "== every stage passed" in log, log
    calls = [(line.split("\t")[0], shlex.split(line.split("\t")[1]))
             for line in record.read_text().splitlines()]
    pytest_calls = [(source, argv) for source, argv in calls if argv[1:3] == ["-m", "pytest"]]
    assert sorted(source for source, _ in pytest_calls) == ["cublas", "triton"]
    for _, argv in pytest_calls:
        files = [a for a in argv if a.startswith("tests/")]
        assert files and all((ROOT / f).is_file() for f in files), files
        assert "-n" in argv and "--timeout" in argv  # pytest-xdist, pytest-timeout: in the image

    bench = next(argv for _, argv in calls if argv[1:3] == ["-m", "benchmarks"])
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    run.add_arguments(parser)
    args = parser.parse_args(bench[3:])
    assert args.device is None  # cuda there; resolved here on the CPU, which checks every name
    options = run.resolve_options(argparse.Namespace(**{**vars(args), "device": "cpu"}))
    assert options.kernels[0] == "token_entropy"  # the quick kernel before a limit can cut in
    assert {"liger_concat", "cce_concat", "gemm_floor", "wmss_triton", "wmss_stats",
            "wmss_frozen_weak"} <= set(options.providers)
    assert set(options.shapes) == {"qwen3-4b", "qwen3-4b-1.7b"}
    assert options.tokens == (4096, 8192, 16384) and options.dtypes == ("bfloat16",)

    ncu = next(argv for _, argv in calls if argv[0] == "ncu")
    step = ncu[ncu.index("-m") + 1:]
    assert step[0] == "benchmarks.profile_step"
    profiled = profile_step._parse_args(step[1:])
    assert (profiled.shape, profiled.tokens) == ("qwen3-4b", 4096)
    assert '--nvtx-include' in ncu and ncu[ncu.index("--nvtx-include") + 1] == (
        profile_step.RANGE + "/")


@pytest.mark.slow
def test_the_dry_run_stops_a_stage_at_its_limit_passes_the_rest_and_packs_the_results(tmp_path):
    """One dry run (~20 s) for both: the setup stage (importing torch takes seconds) gets a
    1-second limit, so it is stopped, and the tests, the benchmark and the profile still run."""
    done, log = _session(tmp_path, "--dry-run", setup=1)
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
    assert "**Targets**" in (results / "bench" / "cpu.md").read_text()
    assert not any(p.name.startswith("pytest-") for p in results.iterdir())


def test_an_unknown_option_prints_the_usage(tmp_path):
    done, _ = _session(tmp_path, "--nope")
    assert done.returncode == 2 and "usage: bash benchmarks/gpu_session.sh" in done.stderr
