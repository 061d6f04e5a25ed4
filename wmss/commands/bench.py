"""``wmss bench``: speed and peak memory of the fused loss and ``token_entropy`` against every
implementation a user could pick instead, checked for correctness first.

The implementation is the ``benchmarks`` package at the root of the source checkout, beside
``wmss/``. It is deliberately not installed (a top-level package named ``benchmarks`` in
site-packages would collide with other projects', and the results it writes belong to the
checkout), so this command finds it relative to this file: ``<checkout>/benchmarks``. That works
for the editable install the README uses (``pip install -e .``) and for running from a clone;
an installed wheel has no checkout and the command says so.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# wmss/commands/bench.py -> the checkout holding wmss/ and benchmarks/
CHECKOUT = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny CPU-sized sweep (one small head pair, 256 and 512 tokens, "
                             "float32 and bfloat16): a smoke test, well under two minutes on a CPU")
    parser.add_argument("--kernels", nargs="+", metavar="NAME",
                        help="fused_loss, token_entropy (default: both)")
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help="naive, torch_compile, liger_concat, cce_concat, gemm_floor, "
                             "wmss_torch, wmss_native, wmss_triton, wmss_triton_cublas, "
                             "wmss_stats, wmss_frozen_weak (default: all, but wmss_torch only on "
                             "a CPU, and wmss_stats and wmss_frozen_weak, the default backend "
                             "with return_stats=True or train_weak=False, only on CUDA; "
                             "unsupported ones are reported, not run)")
    parser.add_argument("--dtypes", nargs="+", metavar="NAME",
                        help="bfloat16, float32 (default: both)")
    parser.add_argument("--shapes", nargs="+", metavar="NAME",
                        help="qwen3-4b, llama3-8b, gemma3-4b, qwen3-4b-1.7b, tiny-pair, "
                             "cpu-512 (default: the real model heads; tiny-pair with --quick; "
                             "cpu-512, d 512 and V 32768, only when named)")
    parser.add_argument("--tokens", nargs="+", type=int, metavar="N",
                        help="token counts (default: 1024..16384 for bfloat16, 1024..4096 for "
                             "float32; 256 512 with --quick)")
    parser.add_argument("--modes", nargs="+", metavar="NAME",
                        help="forward, backward, full (default: all; token_entropy has forward)")
    parser.add_argument("--inputs", nargs="+", metavar="MODE",
                        help="gaussian, realistic (peaked, heavy-tailed next-token distributions "
                             "like a trained LM's); default: gaussian; naming both runs both")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="results folder (default: benchmarks/results in the checkout)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")


def load_benchmarks():
    """Import ``benchmarks.run`` from the checkout that holds this ``wmss``."""
    package = CHECKOUT / "benchmarks"
    if not (package / "run.py").is_file():
        raise ImportError(f"wmss bench needs the source checkout (no {package}); clone the "
                          "repository and `pip install -e .` there")
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    module = importlib.import_module("benchmarks.run")
    found = Path(module.__file__).resolve().parent
    if found != package:
        raise ImportError(f"another 'benchmarks' package ({found}) shadows {package}")
    return module


def run(args) -> int:
    try:
        benchmarks_run = load_benchmarks()
    except ImportError as error:
        print(f"wmss bench: {error}", file=sys.stderr)
        return 2
    return benchmarks_run.main(args)
