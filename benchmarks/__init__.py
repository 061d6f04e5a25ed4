"""Speed and peak memory of wmss against every implementation a user could pick instead.

``wmss bench`` (``wmss/commands/bench.py``) is the front door; ``python -m benchmarks`` is the
same command. Modules:

* ``shapes``: the lm-head shapes, token sweeps, input settings, the correctness rule's constants
  and timing settings (every tunable).
* ``inputs``: the inputs every provider gets, ``gaussian`` or ``realistic`` (peaked, heavy-tailed
  next-token distributions like a trained LM's).
* ``providers``: naive, torch_compile, liger_concat, cce_concat, gemm_floor, wmss_torch,
  wmss_native, wmss_triton, wmss_triton_cublas, and the default backend with an option
  (wmss_stats, wmss_frozen_weak); each builds the timed step of a mode.
* ``check``: the one rule every provider is judged by before it is timed: its error against
  float64 at most a factor times the plain formula's error in the input dtype.
* ``measure``: time (``triton.testing.do_bench`` on GPU; providers interleaved on CPU) and peak
  memory above the inputs.
* ``run``: the sweep; ``csvio``: the results CSV; ``report``: markdown tables, with the GPU
  issue's targets; ``plot``: PNGs; ``merge``: fold a CSV measured on another machine into
  ``results/``.
* ``profile_step``: warm-up steps, then one step between ``cudaProfilerStart`` and
  ``cudaProfilerStop``, for Nsight Compute.
* ``gpu_session.sh``: the GPU issue's measurements in one device command (tests, the benchmark,
  a profile), each stage under a time limit.

Results go to ``benchmarks/results/<device>.csv`` (+ ``.md`` and PNGs); ``NOTES.md`` holds the
GPU performance notes (FLOP and byte floors, predictions).
"""
