"""``wmss demo``: WMSS against plain SFT at the same epoch budget on a tiny model (see wmss.recipe.demo)."""

from __future__ import annotations

import shutil
import sys
import tempfile

from ..recipe.demo import DemoSettings, run_demo



def add_arguments(parser) -> None:
    defaults = DemoSettings()
    parser.add_argument("--output-dir", help="keep everything here, the comparison plot "
                        "included (default: a temporary directory, removed at the end)")
    parser.add_argument("--train-size", type=int, default=defaults.train_size)
    parser.add_argument("--pretrain-size", type=int, default=defaults.pretrain_size,
                        help="lines of arithmetic text the base model M0 is trained on (0: M0 is "
                        "the random initialisation)")
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size)
    parser.add_argument("--digits", type=int, default=defaults.digits)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the first seed")
    parser.add_argument("--seeds", type=int, default=defaults.seeds,
                        help="run the comparison for this many seeds (--seed, --seed + 1, ...) "
                        "and report the mean and sample standard deviation of both arms "
                        "(default %(default)s)")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _say(line: str) -> None:
    print(line, flush=True)  # at once, also when stdout is a file or a pipe


def run(args) -> int:
    try:  # every setting checked before anything is made
        settings = DemoSettings(train_size=args.train_size, pretrain_size=args.pretrain_size,
                                eval_size=args.eval_size, digits=args.digits,
                                hidden_size=args.hidden_size, num_layers=args.num_layers,
                                batch_size=args.batch_size, learning_rate=args.learning_rate,
                                seed=args.seed, seeds=args.seeds)
    except (TypeError, ValueError) as error:
        print(f"wmss demo: error: {error}", file=sys.stderr)
        return 1
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="wmss-demo-")
    try:
        result = run_demo(output_dir, settings, log=_say, progress=_progress)
    except (ValueError, OSError) as error:  # bad settings or files: a message, not a traceback
        print(f"wmss demo: error: {error}", file=sys.stderr)
        return 1
    finally:
        if args.output_dir is None:
            shutil.rmtree(output_dir, ignore_errors=True)
    _say(f"[demo] finished in {result.seconds:.0f} s")
    _say(result.logit_stats_table())
    if len(result.runs) > 1:
        for line in result.per_seed_lines():
            _say(line)
    _say(result.summary_line())
    if result.plot and args.output_dir is not None:
        _say(f"[demo] comparison plot: {result.plot}")
    elif result.plot:
        _say("[demo] (the comparison plot and the runs were in a temporary directory, now "
             "removed: pass --output-dir to keep them)")
    return 0
