"""``python -m benchmarks [options]`` from the repository root: the same as ``wmss bench``."""

import sys

from wmss.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
