"""``wmss select``: WD-DS on a JSONL data set: score it with both models, draw the active set.

Writes three files into ``--output-dir`` (each atomically):

* ``scores.json``: per-example ``H_strong``, ``H_weak`` and supervised-token counts
  (``wmss.selection.DatasetScores.save``). It doubles as the checkpoint: rerunning the same command
  after an interruption scores only what is missing, and a complete one is reused as it is (so
  re-selecting with other ``--alpha/--beta/--gamma/--seed`` costs no model pass);
* ``active_indices.json``: the selected records, a sorted JSON list of 0-based record indices
  into ``--data`` (blank lines are not records);
* ``selection_summary.json``: the printed summary (``wmss.selection.summarize``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from wmss import defaults
from wmss.validation import BACKENDS

HELP = "WD-DS: score a JSONL data set with a strong and a weak model and draw the active set"

SCORES_FILE = "scores.json"
ACTIVE_FILE = "active_indices.json"
SUMMARY_FILE = "selection_summary.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    return parse


def add_arguments(parser) -> None:
    parser.add_argument("--strong", required=True, metavar="PATH",
                        help="strong model (M_t): a transformers checkpoint directory or hub name; "
                             "its tokenizer encodes the data")
    parser.add_argument("--weak", required=True, metavar="PATH",
                        help="weak model (M_t-1), sharing the strong model's tokenizer")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl",
                        help="records: {prompt, completion}, {messages} or {text} per line "
                             "(see wmss.data)")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help=f"where {SCORES_FILE}, {ACTIVE_FILE} and {SUMMARY_FILE} go")
    weights = parser.add_argument_group("sampling weights")
    weights.add_argument("--alpha", type=_non_negative_float, default=defaults.ALPHA,
                         help="weight of [-dH]_+ (weak model more uncertain) (default %(default)s)")
    weights.add_argument("--beta", type=_non_negative_float, default=defaults.BETA,
                         help="weight of H (default %(default)s)")
    weights.add_argument("--gamma", type=_non_negative_float, default=defaults.GAMMA,
                         help="weight of [dH]_+ (strong model more uncertain) "
                              "(default %(default)s)")
    weights.add_argument("--normalize", choices=("paper", "per_term"), default="paper",
                         help="'paper': Eq. 9; 'per_term': each term normalised to sum 1 first, "
                              "as the authors' code does (default %(default)s)")
    weights.add_argument("--entropy-term", choices=("strong", "weak"), default="strong",
                         help="whose entropy the beta term uses: the paper's strong model or the "
                              "base (weak) model as the authors' code (default %(default)s)")
    weights.add_argument("--seed", type=_int_at_least(0), default=0,
                         help="seed of the draws (default %(default)s)")
    weights.add_argument("--num-draws", type=_int_at_least(0), default=None,
                         help="draws with replacement (default: the number of records, |D|)")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--batch-size", type=_int_at_least(1), default=8,
                         help="examples per forward pass (default %(default)s)")
    scoring.add_argument("--max-length", type=_int_at_least(2), default=defaults.MAX_LENGTH,
                         help="tokens per example; longer ones are cut (default %(default)s)")
    scoring.add_argument("--backend", choices=BACKENDS, default="auto",
                         help="token_entropy backend (default %(default)s)")
    scoring.add_argument("--device", default=None,
                         help="torch device for both models (default: cuda if available, else cpu)")
    scoring.add_argument("--dtype", choices=DTYPES, default="auto",
                         help="model dtype; 'auto' keeps the checkpoint's (default %(default)s)")
    scoring.add_argument("--save-interval", type=_non_negative_float, default=60.0,
                         help="seconds between checkpoints of the scores (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (a scores file of the same models "
                             "and data is still reused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_model(path: str, dtype: str, device: str):
    from wmss.hf import load_causal_lm

    return load_causal_lm(path, dtype).to(device)


def _format_summary(summary: dict, output_dir: str) -> str:
    def number(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    options, share = summary["options"], summary["term_share"]
    beta_name = "H_strong" if options["entropy_term"] == "strong" else "H_weak"
    return "\n".join([
        f"examples: {summary['examples']} ({summary['examples_without_supervised_tokens']} "
        f"with no supervised token: weight 0), {summary['supervised_tokens']} supervised tokens",
        f"mean entropy per example (nats): H_strong {number(summary['mean_entropy_strong'])}, "
        f"H_weak {number(summary['mean_entropy_weak'])}, "
        f"dH {number(summary['mean_discrepancy'], '+.4f')} "
        f"(weak more uncertain on {summary['examples_weak_more_uncertain']}, strong on "
        f"{summary['examples_strong_more_uncertain']})",
        f"weight mass (normalize={options['normalize']}, alpha={options['alpha']:g}, "
        f"beta={options['beta']:g}, gamma={options['gamma']:g}): "
        f"alpha*[-dH]_+ {share['alpha']:.1%}, beta*{beta_name} {share['beta']:.1%}, "
        f"gamma*[dH]_+ {share['gamma']:.1%}",
        f"selected: {summary['selected']} of {summary['examples']} "
        f"({summary['selected_fraction']:.1%}) from {summary['num_draws']} draws "
        f"(seed {summary['seed']}; expected {summary['expected_selected']:.1f})",
        f"wrote {SCORES_FILE}, {ACTIVE_FILE}, {SUMMARY_FILE} to {output_dir}",
    ])


def _select(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from wmss import data, selection
    from wmss.io import atomic_write_json

    if args.alpha == args.beta == args.gamma == 0:
        raise ValueError("--alpha, --beta and --gamma are all 0: every example would have weight 0")
    os.makedirs(args.output_dir, exist_ok=True)
    paths = {name: os.path.join(args.output_dir, name)
             for name in (SCORES_FILE, ACTIVE_FILE, SUMMARY_FILE)}
    existing = [name for name in (ACTIVE_FILE, SUMMARY_FILE) if os.path.exists(paths[name])]
    if existing and not args.overwrite:
        raise ValueError(f"{args.output_dir} already holds {', '.join(existing)}; pass "
                         "--overwrite to replace them (or choose another --output-dir)")

    records = data.load_jsonl(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.strong)
    dataset = data.encode_records(records, tokenizer, args.max_length)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    strong = _load_model(args.strong, args.dtype, device)
    weak = _load_model(args.weak, args.dtype, device)
    scores = selection.score_dataset(
        strong, weak, dataset, batch_size=args.batch_size,
        pad_token_id=data.pad_token_id(tokenizer),
        output=paths[SCORES_FILE], backend=args.backend, progress=not args.no_progress,
        overwrite=args.overwrite, save_interval=args.save_interval)
    del strong, weak  # free the models before the (CPU-only) rest

    options = dict(alpha=args.alpha, beta=args.beta, gamma=args.gamma, normalize=args.normalize,
                   entropy_term=args.entropy_term)
    weights = selection.sampling_weights(scores.entropy_strong, scores.entropy_weak, **options)
    active = selection.draw_active(weights, args.num_draws, seed=args.seed)
    summary = selection.summarize(scores, weights, active, num_draws=args.num_draws,
                                  seed=args.seed, **options)
    summary["data"] = os.path.abspath(args.data)
    summary["models"] = {"strong": args.strong, "weak": args.weak}
    atomic_write_json(paths[ACTIVE_FILE], active.tolist())
    atomic_write_json(paths[SUMMARY_FILE], summary, indent=2)
    print(_format_summary(summary, args.output_dir))
    return 0


def run(args) -> int:
    try:
        return _select(args)
    except (ValueError, OSError) as error:  # bad input or files: a message, not a traceback
        print(f"wmss select: error: {error}", file=sys.stderr)
        return 1
