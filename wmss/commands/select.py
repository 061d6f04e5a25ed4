"""``wmss select``: WD-DS on a JSONL data set: score it with both models, draw the active set.

Writes three files into ``--output-dir`` (each atomically; names from ``wmss.selection``):

* ``scores.json`` (``SCORES_FILE``): per-example ``H_strong``, ``H_weak`` and supervised-token
  counts (``wmss.selection.DatasetScores.save``). It doubles as the checkpoint: rerunning the same
  command after an interruption scores only what is missing, and a complete one is reused as it is
  (so re-selecting with other ``--alpha/--beta/--gamma/--seed`` costs no model pass);
* ``active_indices.json`` (``ACTIVE_FILE``): the selected records, a sorted JSON list of 0-based
  record indices into ``--data`` (blank lines are not records), with repeats under
  ``--keep-duplicates``;
* ``selection_summary.json`` (``SUMMARY_FILE``): the printed summary
  (``wmss.selection.summarize``).

Every option and input (the data file, the tokenizer, both model configs, an existing scores
file's data set) is checked before the models' weights are loaded. The run holds
``wmss.io.directory_lock`` on ``--output-dir`` throughout: a second run in the same directory is
refused while the first one lasts.

``add_selection_arguments`` and ``selection_options`` are the WD-DS options shared with
``wmss train``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from wmss import defaults
from wmss.recipe.selection import (ACTIVE_FILE, ENTROPY_TERMS, MAX_DRAWS, MAX_KEPT_DRAWS, NORMALIZATIONS,
                            SCORES_FILE, SEED_LIMIT, SUMMARY_FILE, SelectionOptions)
from wmss.loss.engines import BACKENDS
from wmss.validation import limit_text

HELP = "WD-DS: score a JSONL data set with a strong and a weak model and draw the active set"

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOCK_OWNER = "wmss select"


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _int_in(minimum: int, limit: int | None = None):
    """An argparse type: an int in ``[minimum, limit)``."""
    bounds = f">= {minimum}" if limit is None else f"in [{minimum}, {limit_text(limit)})"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}") \
                from None
        if value < minimum or (limit is not None and value >= limit):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text}")
        return value

    return parse


def add_selection_arguments(parser_or_group) -> None:
    """The WD-DS options (``SelectionOptions``'s fields) on an argparse parser or group.

    Adds ``--alpha --beta --gamma --normalize --entropy-term --num-draws --seed
    --keep-duplicates``, each with a type that rejects values out of range; read them back with
    ``selection_options(args)``, which also checks what no single argument can (alpha, beta and
    gamma all 0; too many draws to keep).
    """
    add = parser_or_group.add_argument
    add("--alpha", type=_non_negative_float, default=defaults.ALPHA,
        help="weight of [-dH]_+ (weak model more uncertain) (default %(default)s)")
    add("--beta", type=_non_negative_float, default=defaults.BETA,
        help="weight of H (default %(default)s)")
    add("--gamma", type=_non_negative_float, default=defaults.GAMMA,
        help="weight of [dH]_+ (strong model more uncertain) (default %(default)s)")
    add("--normalize", choices=NORMALIZATIONS, default="paper",
        help="'paper': Eq. 9; 'per_term': each term normalised to sum 1 first, as the authors' "
             "code does (default %(default)s)")
    add("--entropy-term", choices=ENTROPY_TERMS, default="strong",
        help="whose entropy the beta term uses: the paper's strong model or the base (weak) "
             "model as the authors' code (default %(default)s)")
    add("--num-draws", type=_int_in(1, MAX_DRAWS + 1), default=None,
        help="draws with replacement (default: the number of records, |D|)")
    add("--seed", type=_int_in(0, SEED_LIMIT), default=0,
        help="seed of the draws (default %(default)s)")
    add("--keep-duplicates", action="store_true",
        help="keep every draw, so an example drawn k times is trained k times (the authors' "
             f"code; at most {limit_text(MAX_KEPT_DRAWS)} draws); by default each drawn example "
             "is kept once (the paper)")


def selection_options(args) -> SelectionOptions:
    """The ``SelectionOptions`` of arguments parsed with ``add_selection_arguments``.

    Raises:
        ValueError: a combination of options no argument alone can refuse (see
            ``SelectionOptions``).
    """
    return SelectionOptions(alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                            normalize=args.normalize, entropy_term=args.entropy_term,
                            num_draws=args.num_draws, seed=args.seed,
                            keep_duplicates=args.keep_duplicates)



def add_model_run_arguments(parser, backend_of: str) -> None:
    """How ``wmss select`` and ``wmss inspect`` run their models over the data: ``--batch-size``,
    ``--max-length``, ``--backend`` (of ``backend_of``), ``--device`` and ``--dtype``."""
    parser.add_argument("--batch-size", type=_int_in(1), default=8,
                        help="examples per forward pass (default %(default)s)")
    parser.add_argument("--max-length", type=_int_in(2), default=defaults.MAX_LENGTH,
                        help="tokens per example; longer ones are cut (default %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help=f"{backend_of} backend (default %(default)s)")
    parser.add_argument("--device", default=None,
                        help="torch device for the models (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model dtype; 'auto' keeps the checkpoint's (default %(default)s)")

def add_arguments(parser) -> None:
    parser.add_argument("--strong", required=True, metavar="PATH",
                        help="strong model (M_t): a transformers checkpoint directory or hub name; "
                             "its tokenizer encodes the data")
    parser.add_argument("--weak", required=True, metavar="PATH",
                        help="weak model (M_t-1), sharing the strong model's tokenizer")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl",
                        help="records: {prompt, completion}, {messages} or {text} per line "
                             "(see wmss.recipe.data)")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help=f"where {SCORES_FILE}, {ACTIVE_FILE} and {SUMMARY_FILE} go")
    add_selection_arguments(parser.add_argument_group("selection (WD-DS)"))
    scoring = parser.add_argument_group("scoring")
    add_model_run_arguments(scoring, "token_entropy")
    scoring.add_argument("--save-interval", type=_non_negative_float, default=60.0,
                         help="seconds between checkpoints of the scores (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (a scores file of the same models "
                             "and data is still reused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_model(path: str, dtype: str, device: str):
    from wmss.hf.models import load_causal_lm

    return load_causal_lm(path, dtype).to(device)


def _format_summary(summary: dict, output_dir: str) -> str:
    def number(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    options, share = summary["options"], summary["term_share"]
    beta_name = "H_strong" if options["entropy_term"] == "strong" else "H_weak"
    duplicates = (f"{summary['duplicates']} repeated draws kept: {summary['active_size']} "
                  "examples to train" if summary["keep_duplicates"]
                  else f"{summary['duplicates']} repeated draws dropped")
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
        f"(seed {summary['seed']}; expected {summary['expected_selected']:.1f}); {duplicates}",
        f"wrote {SCORES_FILE}, {ACTIVE_FILE}, {SUMMARY_FILE} to {output_dir}",
    ])


def _device(name):
    """The torch device for both models, checked before anything is loaded."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: not a torch device: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _select(args) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from wmss.hf import batches
    from wmss.recipe import data, selection
    from wmss.io import directory_lock

    # Everything that can be checked without the models' weights is, before they are loaded.
    options = selection_options(args)
    device = _device(args.device)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir} exists and is not a directory")
    records = data.read_records(args.data)  # before any download: errors name file:line
    tokenizer = AutoTokenizer.from_pretrained(args.strong)
    dataset = data.encode_records(records, tokenizer, args.max_length)
    for model in (args.strong, args.weak):
        AutoConfig.from_pretrained(model)  # a path that is no model fails here, not later

    with directory_lock(args.output_dir, LOCK_OWNER):  # creates the directory
        paths = {name: os.path.join(args.output_dir, name)
                 for name in (SCORES_FILE, ACTIVE_FILE, SUMMARY_FILE)}
        existing = [name for name in (ACTIVE_FILE, SUMMARY_FILE) if os.path.exists(paths[name])]
        if existing and not args.overwrite:
            raise ValueError(f"{args.output_dir} already holds {', '.join(existing)}; pass "
                             "--overwrite to replace them (or choose another --output-dir)")
        selection.check_scores_output(paths[SCORES_FILE], dataset, overwrite=args.overwrite)

        strong = _load_model(args.strong, args.dtype, device)
        weak = _load_model(args.weak, args.dtype, device)
        scores = selection.score_dataset(
            strong, weak, dataset, batch_size=args.batch_size,
            pad_token_id=batches.pad_token_id(tokenizer),
            output=paths[SCORES_FILE], backend=args.backend, progress=not args.no_progress,
            overwrite=args.overwrite, save_interval=args.save_interval)
        del strong, weak  # free the models before the (CPU-only) rest

        chosen = selection.select_active(scores, options)
        selection.save_selection(chosen, args.output_dir, extra_summary={
            "data": os.path.abspath(args.data),
            "models": {"strong": args.strong, "weak": args.weak}})
    print(_format_summary(chosen.summary, args.output_dir))
    return 0


def run(args) -> int:
    try:
        return _select(args)
    except (ValueError, OSError) as error:  # bad input or files: a message, not a traceback
        print(f"wmss select: error: {error}", file=sys.stderr)
        return 1
