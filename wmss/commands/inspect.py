"""``wmss inspect``: the means of ``wmss.logit_stats`` over a JSONL data set's supervised tokens.

For ``--model`` alone, or with ``--weak`` for both models and their mixture
``lam z_model + (1 - lam) z_weak`` (``--lam``): the target logit, the mean logit, the mean and the
largest non-target logit, the margin, the rank of the target, the entropy and the target
log-probability (``wmss.recipe.inspect``). Printed as a table; ``--output FILE`` also writes them
as JSON (atomically; an existing file is replaced only with ``--overwrite``).

Every option and input (the data file, the tokenizer, the model configs, the output path) is
checked before any model's weights are loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from wmss import defaults

from .select import _device, _load_model, add_model_run_arguments


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="the model (the strong one with --weak): a transformers checkpoint "
                             "directory or hub name; its tokenizer encodes the data")
    parser.add_argument("--weak", default=None, metavar="PATH",
                        help="a weak model sharing the tokenizer: its statistics and those of "
                             "the mixture are reported too")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl",
                        help="records: {prompt, completion}, {messages} or {text} per line "
                             "(see wmss.recipe.data)")
    parser.add_argument("--lam", type=_unit_float, default=None,
                        help=f"mixture weight of --model (with --weak; default {defaults.LAMBDA})")
    parser.add_argument("--output", default=None, metavar="FILE.json",
                        help="also write the means as JSON there")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output file")
    add_model_run_arguments(parser, "wmss.logit_stats")


def _check_output(path, overwrite: bool) -> None:
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"--output {path} is a directory; give a file name")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"--output {path} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"--output {path}: no such directory {parent}")


def _check_mixable(paths) -> None:
    """Soft-capped heads have no linear mixture (``wmss.recipe.inspect``): refused from their
    configs, before any weights are loaded."""
    from transformers import AutoConfig

    for option, path in paths:
        cap = getattr(AutoConfig.from_pretrained(path), "final_logit_softcapping", None)
        if cap is not None:
            raise ValueError(f"{option} {path} soft-caps its logits (final_logit_softcapping="
                             f"{cap:g}): the mixture of capped logits cannot be inspected; "
                             "inspect each model without --weak")


def _inspect(args) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from wmss.hf import batches
    from wmss.io import atomic_write_json
    from wmss.recipe import data
    from wmss.recipe.inspect import format_table, inspect_models

    if args.lam is not None and args.weak is None:
        raise ValueError("--lam weighs the mixture with --weak; give --weak too")
    lam = defaults.LAMBDA if args.lam is None else args.lam
    device = _device(args.device)
    _check_output(args.output, args.overwrite)
    records = data.read_records(args.data)  # before any download: errors name file:line
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = data.encode_records(records, tokenizer, args.max_length)
    paths = [("--model", args.model)] + ([("--weak", args.weak)] if args.weak else [])
    for _, path in paths:
        AutoConfig.from_pretrained(path)  # a path that is no model fails here, not later
    if args.weak is not None:
        _check_mixable(paths)

    strong = _load_model(args.model, args.dtype, device)
    weak = None if args.weak is None else _load_model(args.weak, args.dtype, device)
    result = inspect_models(strong, dataset, weak_model=weak, lam=lam,
                            batch_size=args.batch_size,
                            pad_token_id=batches.pad_token_id(tokenizer), backend=args.backend)
    result = {"data": os.path.abspath(args.data),
              "models": {"strong": args.model, **({"weak": args.weak} if args.weak else {})},
              **result}
    print(format_table(result))
    if args.output is not None:
        atomic_write_json(args.output, result, indent=2)
        print(f"wrote {args.output}")
    return 0


def run(args) -> int:
    try:
        return _inspect(args)
    except (ValueError, OSError) as error:  # bad input or files: a message, not a traceback
        print(f"wmss inspect: error: {error}", file=sys.stderr)
        return 1
