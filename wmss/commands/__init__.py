"""The ``wmss`` command: ``wmss demo | select | train | inspect | bench`` (each with ``--help``).

``main`` is the entry point (``wmss`` and ``python -m wmss``). Each subcommand lives in
``wmss/commands/<name>.py`` and provides ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when used.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# name -> one-line description; the implementation is wmss.commands.<name>.
COMMANDS = {
    "demo": "WMSS vs SFT on a built-in arithmetic task and tiny model (CPU, minutes, no downloads)",
    "train": "run the WMSS recipe on a JSONL data set: SFT warm-up, selection, joint training",
    "select": "WD-DS: score a JSONL data set with a strong and a weak model and draw the active set",
    "inspect": "means of the per-token logit statistics (wmss.logit_stats) of a model over a "
               "data set, with --weak of the pair and its mixture",
    "bench": "speed and peak memory of the fused loss and token_entropy vs every alternative",
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wmss", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, summary in COMMANDS.items():
        sub = subparsers.add_parser(name, help=summary, description=summary)
        if name == wanted:  # import only the command that runs (or whose --help is asked)
            importlib.import_module(f"wmss.commands.{name}").add_arguments(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return importlib.import_module(f"wmss.commands.{args.command}").run(args)
