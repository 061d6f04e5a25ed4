"""The compile gate (``wmss_kernels.compile_check``): real Triton + ptxas builds for sm_90/sm_80.

The test suite runs Triton's interpreter (``TRITON_INTERPRET=1``, see conftest), under which
kernels cannot be compiled: the gate's Python API then runs itself in a subprocess without it,
and the tests that need the un-interpreted kernels in-process run a script the same way.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from wmss_kernels import compile_check
from wmss_kernels.compile_check import SHARED_LIMITS, BuildRow, Usage, Variant
from wmss_kernels.config import Tiles

pytest.importorskip("triton")  # the gate itself imports Triton only when it records or compiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A subset that compiles in seconds: the combine kernel (no tl.dot) of the "cublas" source.
SMALL_SUBSET = ["--arch", "sm_90", "--dtypes", "bf16", "--sources", "cublas",
                "--kernels", "_stats_combine_kernel"]
# The tiles of a test in test_kernels.py: legal under the interpreter, but with float32 operands
# their 16x128 and 256x128 tiles (136 KB, buffered twice for three stages) overflow sm_90's 227 KB.
OVERSIZED_TILES = Tiles(16, 256, 128, num_warps=4, num_stages=3)
# The fields of a --json row, in order (the format).
JSON_FIELDS = ["kernel", "arch", "dtype", "config", "shared_bytes", "registers", "spills", "wgmma",
               "ok"]


def compiler_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def run_without_interpreter(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=compiler_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_writes_one_json_row_per_build(tmp_path):
    out = tmp_path / "gate.json"
    done = run_without_interpreter("-m", "wmss_kernels.compile_check", *SMALL_SUBSET,
                                   "--json", str(out))
    assert done.returncode in (0, 1), done.stdout + done.stderr
    rows = json.loads(out.read_text())
    # One model; two models, with or without gap masking (the "cublas" source has one split).
    assert len(rows) >= 3
    for row in rows:
        assert list(row) == JSON_FIELDS
        assert row["kernel"] == "_stats_combine_kernel"
        assert (row["arch"], row["dtype"]) == ("sm_90", "bf16")
        assert isinstance(row["config"], str) and "BLOCK_N=" in row["config"]
        assert 0 <= row["shared_bytes"] <= SHARED_LIMITS[90]
        assert 0 < row["registers"] <= 255 and isinstance(row["spills"], int)
        assert row["wgmma"] is False and isinstance(row["ok"], bool)
    assert done.returncode == (0 if all(row["ok"] for row in rows) else 1)
    assert len({row["config"] for row in rows}) == len(rows), "rows must be distinguishable"
    assert os.listdir(tmp_path) == ["gate.json"], "the JSON is written through a renamed temp"
    assert done.stdout.count("_stats_combine_kernel") >= len(rows)


def test_cli_exit_status_names_the_failing_builds(tmp_path, monkeypatch, capsys):
    """``main`` with a stand-in gate: status 1 and a FAIL line per row that is not ok."""
    good = BuildRow("_a_kernel", "sm_90", "bf16", "BLOCK_N=64", 1024, 128, 0, True, True)
    bad = BuildRow("_b_kernel", "sm_80", "fp32", "BLOCK_N=16", 300_000, 255, 8, False, False,
                   ("shared memory 300000 B > 166912 B", "spills 8 B of registers"))
    monkeypatch.setattr(compile_check.config, "is_interpreting", lambda: False)
    monkeypatch.setattr(compile_check, "_gate", lambda *args: [good, bad])
    out = tmp_path / "rows.json"
    assert compile_check.main(["--arch", "sm_90", "sm_80", "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "FAIL _b_kernel sm_80 fp32 [BLOCK_N=16]: shared memory 300000 B" in printed
    assert "FAIL _a_kernel" not in printed
    assert [row["ok"] for row in json.loads(out.read_text())] == [True, False]
    monkeypatch.setattr(compile_check, "_gate", lambda *args: [good])
    assert compile_check.main(["--arch", "sm_90"]) == 0


def test_problems_of_a_build():
    limit = SHARED_LIMITS[90]
    fine = Usage(shared_bytes=limit, registers=200, spills=0, wgmma=True, has_dot=True)
    assert compile_check.problems(90, "bf16", fine) == ()
    over = Usage(shared_bytes=limit + 1, registers=255, spills=24, wgmma=False, has_dot=True)
    assert len(compile_check.problems(90, "bf16", over)) == 3
    # wgmma is required of bf16 dot kernels on sm_90 only.
    no_wgmma = Usage(shared_bytes=0, registers=64, spills=0, wgmma=False, has_dot=True)
    assert compile_check.problems(90, "bf16", no_wgmma) == ("no wgmma",)
    assert compile_check.problems(90, "fp16", no_wgmma) == ()
    assert compile_check.problems(80, "bf16", no_wgmma) == ()
    no_dot = Usage(shared_bytes=0, registers=64, spills=0, wgmma=False, has_dot=False)
    assert compile_check.problems(90, "bf16", no_dot) == ()
    assert compile_check.problems(80, "bf16", Usage(error="boom"))[0].startswith("does not")
    assert compile_check.problems(80, "bf16", Usage(shared_bytes=SHARED_LIMITS[80] + 1,
                                                    registers=1, spills=0))


def test_ptxas_log_parsing():
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_k' for 'sm_90a'
        ptxas info    : Function properties for _k
            24 bytes stack frame, 20 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size
        """)
    assert compile_check.parse_ptxas_log(log) == (255, 32)
    assert compile_check.parse_ptxas_log(log.replace("20 bytes spill stores, 12",
                                                     "0 bytes spill stores, 0")) == (255, 0)
    assert compile_check.parse_ptxas_log("ptxas info    : 0 bytes gmem") is None


def test_oversized_tiles_are_not_ok_on_sm_90():
    rows = compile_check.check_tiles([OVERSIZED_TILES], ["sm_90"],
                                     variants=[Variant("fp32", two_models=False)],
                                     kernels=["_stats_partials_kernel"])
    assert len(rows) == 1, rows
    (row,) = rows
    assert "BLOCK_N=16 BLOCK_V=256 BLOCK_D=128 warps=4 stages=3" in row.config
    assert row.shared_bytes > SHARED_LIMITS[90] and not row.ok
    assert any("shared memory" in problem for problem in row.problems)


def test_the_tiles_the_kernel_tests_force_fit_a_gpus_shared_memory():
    """Custom tiles are test-only (no wgmma needed, a few spilled registers cost only speed), but
    they must launch on a GPU: within sm_90's and sm_80's shared memory, in both precisions."""
    from test_kernels import DECOMPOSITIONS, GROUPING_TILES

    tiles = [t for t, _, _ in DECOMPOSITIONS if t is not None] + [GROUPING_TILES]
    variants = [Variant(dtype, bias=True, softcap=True, gap=True) for dtype in ("fp32", "bf16")]
    variants.append(Variant("bf16"))  # the single-accumulator backward
    rows = compile_check.check_tiles(tiles, ["sm_90", "sm_80"], variants=variants)
    assert {row.kernel for row in rows} >= {"_stats_partials_kernel", "_logit_grad_kernel",
                                             "_mixed_grad_kernel"}
    for row in rows:
        arch = int(row.arch.removeprefix("sm_"))
        assert row.shared_bytes <= SHARED_LIMITS[arch], row


def test_default_bf16_stats_kernel_uses_wgmma_on_sm_90_only():
    """The paper's loss in bf16 (two models, no bias, no soft-cap): its forward statistics
    kernel with the tiles config chooses."""
    rows = compile_check.check(["sm_90", "sm_80"], variants=[Variant("bf16")],
                               kernels=["_stats_partials_kernel"])
    by_arch = {row.arch: row for row in rows}
    assert sorted(by_arch) == ["sm_80", "sm_90"] and len(rows) == 2, rows
    assert by_arch["sm_90"].wgmma and "no wgmma" not in by_arch["sm_90"].problems
    assert not by_arch["sm_80"].wgmma
    for row in rows:
        assert 0 < row.shared_bytes <= SHARED_LIMITS[int(row.arch[3:])]
        assert 0 < row.registers <= 255


TINY_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def tiny_kernel(x_ptr, y_ptr, n, m, scale, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, x * scale, mask=offs < m)
"""


def test_specialization_matches_triton_and_ptxas_fallback(tmp_path, monkeypatch):
    """In-process recording (in a subprocess without the interpreter): Triton's binder and the
    fallback specialization agree on every launch of a few variants and on a launch by hand
    (16-byte alignment, Triton's ``== 1`` integers); a build's registers from Triton's own ptxas
    log (fresh compile) equal those of ``run_ptxas`` (cache hit, no log)."""
    (tmp_path / "tiny_module.py").write_text(TINY_KERNEL)
    script = textwrap.dedent("""
        import os
        import sys

        import torch

        from wmss_kernels import compile_check as cc

        variants = [cc.Variant("bf16", "triton", gap=True, softcap=True, bias=True),
                    cc.Variant("fp16", "cublas", train_weak=False, lam=1.0),
                    cc.Variant("fp32", "triton", two_models=False, tf32=True)]
        for variant in variants:
            binder, own = [], []
            with cc.recording(90, binder):
                cc.drive(variant)
            with cc.recording(90, own, own=True):
                cc.drive(variant)
            assert binder and binder == own, (variant, set(binder) ^ set(own))
        assert any(value == "tf32" for build in binder for _, value in build.constexprs)

        sys.path.insert(0, os.environ["GATE_TEST_DIR"])
        from tiny_module import tiny_kernel

        floats = torch.zeros(64)
        args = (floats[1:], floats, 1, 32, 0.5)
        kwargs = dict(BLOCK=64, num_warps=4)
        build = cc.specialize(tiny_kernel, 90, args, kwargs)
        assert build == cc.specialize(tiny_kernel, 90, args, kwargs, own=True)
        assert {path[0] for path, _ in build.attrs} == {1, 3}, build.attrs  # y_ptr, m=32
        assert dict(build.constexprs) == {(2,): 1, (5,): 64}, build.constexprs
        assert dict(build.options) == {"num_warps": 4}

        os.environ["TRITON_CACHE_DIR"] = os.environ["GATE_TEST_DIR"]
        runs = []
        run_ptxas = cc.run_ptxas
        cc.run_ptxas = lambda *args: runs.append(args) or run_ptxas(*args)
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        from_log = cc.compile_build(build)
        assert not runs
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "0"
        from_ptxas = cc.compile_build(build)
        assert len(runs) == 1
        assert from_log.error is None and from_log.registers > 0, from_log
        assert (from_ptxas.registers, from_ptxas.spills) == (from_log.registers, from_log.spills)
        assert not from_log.has_dot and not from_log.wgmma
        print("OK", from_log)
        """)
    monkeypatch.setenv("GATE_TEST_DIR", str(tmp_path))
    done = run_without_interpreter("-c", script)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def test_production_variants_cover_every_option():
    variants = compile_check.production_variants()
    assert len(set(variants)) == len(variants)
    assert {v.dtype for v in variants} == {"bf16", "fp16", "fp32"}
    assert {v.source for v in variants} == {"triton", "cublas"}
    assert {v.dtype for v in variants if v.tf32} == {"fp32"}
    mixed = [v for v in variants if v.two_models]
    for option in ("bias", "softcap", "gap", "train_weak"):
        assert {getattr(v, option) for v in mixed} == {False, True}, option
    assert {v.lam for v in mixed} >= {0.5, 1.0}
    # The paper's loss (one shared gradient buffer) and one model alone, for every dtype.
    assert {v.dtype for v in mixed if not (v.softcap or v.gap) and v.train_weak} == {
        "bf16", "fp16", "fp32"}
    assert {(v.dtype, v.bias, v.softcap) for v in variants if not v.two_models} == {
        (d, b, s) for d in ("bf16", "fp16", "fp32") for b in (False, True) for s in (False, True)}


def test_every_kernel_is_recorded():
    """The production variants launch every ``*_kernel`` of the launcher modules (a kernel no
    variant reaches would go unchecked)."""
    script = textwrap.dedent("""
        from triton.runtime.jit import JITFunction

        from wmss_kernels import compile_check as cc, fused_stats, logit_grad, logit_stats

        kernels = {name for module in (fused_stats, logit_grad, logit_stats)
                   for name, value in vars(module).items()
                   if isinstance(value, JITFunction) and name.endswith("_kernel")}
        recorded = {build.kernel for build in cc.record(90, cc.production_variants())}
        assert kernels and recorded == kernels, (kernels, recorded)
        print("OK", sorted(recorded))
        """)
    done = run_without_interpreter("-c", script)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def test_rows_of_builds_with_equal_configs_are_told_apart():
    """Builds that differ only in an argument's alignment or type get distinct configs."""
    def build(aligned):
        return compile_check.Build(
            module="m", kernel="_k", arch=90,
            signature=(("x_ptr", "*bf16"), ("n", "i32"), ("BLOCK", "constexpr")),
            constexprs=(((2,), 64),), attrs=(((0,), (("tt.divisibility", 16),)),) + (
                (((1,), (("tt.divisibility", 16),)),) if aligned else ()),
            options=(("num_warps", 4),))
    builds = [build(True), build(False)]
    assert builds[0].describe() == builds[1].describe() == "BLOCK=64 warps=4"
    rows = [BuildRow("_k", "sm_90", "bf16", b.describe(), 0, 1, 0, True, True) for b in builds]
    configs = [row.config for row in compile_check._distinguish(rows, builds)]
    assert configs == ["BLOCK=64 warps=4 n:i32/16", "BLOCK=64 warps=4 n:i32"]


def test_the_in_place_gradient_kernel_synchronises_its_warps_before_each_store():
    """The "cublas" backward writes each tile's gradients over float32 logits that other warps
    of the program may not have read yet (a race on a GPU; the interpreter runs every program as
    one thread, so only the compiled kernel can show it): its loop holds a CTA-wide barrier
    between the tile's loads and its stores."""
    script = textwrap.dedent("""
        import importlib

        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from wmss_kernels import compile_check as cc

        builds = cc.record(90, [cc.Variant("bf16", "cublas", softcap=True, gap=True)])
        (build,) = [b for b in builds if b.kernel == "_loaded_grad_kernel"]
        fn = getattr(importlib.import_module(build.module), build.kernel)
        source = ASTSource(fn=fn, signature=dict(build.signature),
                           constexprs=dict(build.constexprs),
                           attrs={path: [list(a) for a in attrs] for path, attrs in build.attrs})
        ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(build.options)).asm["ttir"]
        loop = ttir[ttir.index("scf.for"):]
        # tl.debug_barrier() is "gpu.barrier" in older Triton IR, "ttg.barrier" in newer.
        barrier = max(loop.find("gpu.barrier"), loop.find("ttg.barrier"))
        load, store = loop.find("tt.load"), loop.find("tt.store")
        assert -1 < load < barrier < store, (load, barrier, store)
        print("barrier between loads and stores")
    """)
    done = run_without_interpreter("-c", script)
    assert done.returncode == 0, done.stdout + done.stderr
