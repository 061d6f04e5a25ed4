"""The ``wmss`` command: ``wmss demo | select | train | inspect | bench`` (each with ``--help``).

``console`` is the entry point (``wmss`` and ``python -m wmss``): ``main`` (callable from Python,
returning the exit code), then the end of a launched run's process (``exit_launched_process``).
Each subcommand lives in
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


def exit_launched_process(code: int) -> None:
    """End a process of a launched run (``WORLD_SIZE`` > 1: torchrun, accelerate launch) that ran
    a command. NCCL: destroy the process group. gloo (CPUs): every process meets at a barrier
    past its last collective, then exits at once with ``code``: with torch 2.13 an interpreter
    finalizing while a gloo worker thread still frees a tensor can abort (``terminate called
    without an active exception``; see tests/ddp_worker.py), and destroying the group instead
    can deadlock. Everything the command wrote is closed by then. Not launched, or no process
    group: nothing."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() != "gloo":
        torch.distributed.destroy_process_group()
        return
    if code == 0:  # a failed process may not meet the others (the launcher stops them all)
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def console() -> None:
    """The ``wmss`` executable: ``main``, then ``exit_launched_process``, then exit."""
    code = main()
    exit_launched_process(code)
    sys.exit(code)
