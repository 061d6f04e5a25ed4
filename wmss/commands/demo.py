"""``wmss demo``: WMSS against plain SFT at the same epoch budget on a tiny model (see wmss.recipe.demo)."""

from __future__ import annotations

import shutil
import sys
import tempfile

from ..recipe.demo import DemoSettings, run_demo



def add_arguments(parser) -> None:
    defaults = DemoSettings()
    parser.add_argument("--output-dir", help="keep everything here (default: a temporary "
                        "directory, removed at the end)")
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
    parser.add_argument("--seed", type=int, default=defaults.seed)


def run(args) -> int:
    settings = DemoSettings(train_size=args.train_size, pretrain_size=args.pretrain_size,
                            eval_size=args.eval_size,
                            digits=args.digits, hidden_size=args.hidden_size,
                            num_layers=args.num_layers, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, seed=args.seed)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="wmss-demo-")
    try:
        result = run_demo(output_dir, settings)
    except (ValueError, OSError) as error:  # bad settings or files: a message, not a traceback
        print(f"wmss demo: error: {error}", file=sys.stderr)
        return 1
    finally:
        if args.output_dir is None:
            shutil.rmtree(output_dir, ignore_errors=True)
    print(f"[demo] finished in {result.seconds:.0f} s")
    print(result.summary_line())
    return 0
