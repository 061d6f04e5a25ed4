"""Speed and peak memory of wmss against every implementation a user could pick instead.

``wmss bench`` (``wmss/commands/bench.py``) is the front door; ``python -m benchmarks`` is the
same command. Modules:

* ``shapes``: the lm-head shapes, token sweeps, tolerances and timing settings (every tunable).
* ``providers``: naive, torch_compile, liger_concat, cce_concat, gemm_floor, wmss_torch,
  wmss_triton, wmss_triton_cublas; each builds the timed step of a mode.
* ``check``: the float64 truth every provider is checked against before it is timed.
* ``measure``: time (``triton.testing.do_bench`` on GPU) and peak memory above the inputs.
* ``run``: the sweep; ``csvio``: the results CSV; ``report``: markdown tables; ``plot``: PNGs;
  ``merge``: fold a CSV measured on another machine into ``results/``.

Results go to ``benchmarks/results/<device>.csv`` (+ ``.md`` and PNGs); ``NOTES.md`` holds the
GPU performance notes (FLOP and byte floors, predictions).
"""
