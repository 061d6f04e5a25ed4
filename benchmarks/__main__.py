"""``python -m benchmarks [options]`` from the repository root: the same as ``wmss bench``, with
this harness's own options added to its parser (``run.add_arguments``: ``--inputs``)."""

import argparse
import sys

from wmss.commands.bench import add_arguments as add_bench_arguments

from . import run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="the same as `wmss bench`")
    add_bench_arguments(parser)
    run.add_arguments(parser)
    return run.main(parser.parse_args(argv))


sys.exit(main())
