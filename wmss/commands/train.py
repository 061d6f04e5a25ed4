"""``wmss train``: the WMSS pipeline (SFT warm-up, WD-DS selection, joint training, K rounds).

The selection options are ``wmss select``'s own (one definition, ``add_selection_arguments``), and
every option is checked (``PipelineConfig``) before anything is loaded or trained.
"""

from __future__ import annotations

import json
import sys

from .. import defaults
from ..recipe.pipeline import Pipeline, PipelineConfig
from .select import add_selection_arguments, selection_options


def add_arguments(parser) -> None:
    start = parser.add_argument_group("start (give --base, or --weak and --strong)")
    start.add_argument("--base", help="base model M0 (path or hub name); an SFT warm-up makes M1")
    start.add_argument("--weak", help="weak model of the first round (skips the warm-up)")
    start.add_argument("--strong", help="strong model of the first round (skips the warm-up)")
    start.add_argument("--tokenizer", help="tokenizer (default: that of --base or --strong)")
    parser.add_argument("--data", required=True,
                        help="JSONL: {prompt, completion}, {messages: [...]} or {text} per line")
    parser.add_argument("--output-dir", required=True,
                        help="one folder per stage; rerunning continues where it stopped")
    method = parser.add_argument_group("method (paper defaults)")
    method.add_argument("--rounds", type=int, default=defaults.ROUNDS)
    method.add_argument("--lam", type=float, default=defaults.LAMBDA,
                        help="weight of the strong logits in the mixture, in [0, 1] "
                             "(default %(default)s)")
    method.add_argument("--gap-threshold", type=float, help="gap masking threshold (default: off)")
    method.add_argument("--frozen-weak", action="store_true",
                        help="do not train the weak model (paper App. B.1)")
    training = parser.add_argument_group("training")
    training.add_argument("--sft-epochs", type=float, default=defaults.SFT_EPOCHS)
    training.add_argument("--wmss-epochs", type=float, default=defaults.WMSS_EPOCHS)
    training.add_argument("--lr", type=float, default=defaults.LEARNING_RATE)
    training.add_argument("--warmup-ratio", type=float, default=defaults.WARMUP_RATIO)
    training.add_argument("--max-grad-norm", type=float, default=defaults.MAX_GRAD_NORM)
    training.add_argument("--max-length", type=int, default=defaults.MAX_LENGTH)
    training.add_argument("--batch-size", type=int, default=1, help="per device")
    training.add_argument("--grad-accum", type=int, default=8)
    training.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                          help="dtype the models are loaded in")
    training.add_argument("--bf16", action="store_true", help="bf16 autocast (Trainer's bf16)")
    training.add_argument("--activation-checkpointing", action="store_true")
    training.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    training.add_argument("--save-steps", type=int, default=500)
    training.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    parallel = parser.add_argument_group(
        "several processes (launch with torchrun or accelerate launch; see the README)")
    parallel.add_argument("--fsdp", metavar="CONFIG",
                          help="FSDP2 on GPUs: TrainingArguments' fsdp_config as a JSON file "
                               "(e.g. examples/fsdp2.json)")
    parallel.add_argument("--deepspeed", metavar="CONFIG",
                          help="DeepSpeed: its JSON config (e.g. examples/zero3.json)")
    lora = parser.add_argument_group("LoRA (both models as adapters of --base, one copy of it)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters (needs peft)")
    lora.add_argument("--lora-rank", type=int, default=defaults.LORA_RANK)
    lora.add_argument("--lora-alpha", type=float, help="default: twice the rank")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--lora-targets", nargs="+", default=["all-linear"], metavar="MODULE",
                      help="PEFT's target_modules (default: all-linear)")
    add_selection_arguments(parser.add_argument_group(
        "WD-DS selection (as wmss select; --seed also seeds training)"))


def config_from_args(args) -> PipelineConfig:
    """The ``PipelineConfig`` of parsed ``wmss train`` arguments (checks every setting)."""
    options = selection_options(args)
    return PipelineConfig(
        output_dir=args.output_dir, data=args.data, base_model=args.base, weak_model=args.weak,
        strong_model=args.strong, tokenizer=args.tokenizer, rounds=args.rounds, lam=args.lam,
        alpha=options.alpha, beta=options.beta, gamma=options.gamma,
        normalize=options.normalize, entropy_term=options.entropy_term,
        num_draws=options.num_draws, keep_duplicates=options.keep_duplicates,
        gap_threshold=args.gap_threshold, train_weak=not args.frozen_weak,
        sft_epochs=args.sft_epochs, wmss_epochs=args.wmss_epochs, learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
        max_length=args.max_length, batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, dtype=args.dtype, bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing, backend=args.backend,
        seed=options.seed, save_steps=args.save_steps, use_cpu=args.cpu,
        fsdp_config=args.fsdp, deepspeed_config=args.deepspeed, **lora_settings(args))


def lora_settings(args) -> dict:
    """The ``PipelineConfig`` LoRA fields of ``--lora ...`` (none without ``--lora``)."""
    if not args.lora:
        given = [flag for flag, value, default in (
            ("--lora-alpha", args.lora_alpha, None), ("--lora-dropout", args.lora_dropout, 0.0),
            ("--lora-targets", args.lora_targets, ["all-linear"]),
            ("--lora-rank", args.lora_rank, defaults.LORA_RANK)) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} given without --lora")
        return {}
    targets = args.lora_targets[0] if len(args.lora_targets) == 1 else args.lora_targets
    return {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout, "lora_target_modules": targets}


def run(args) -> int:
    pipeline = None
    try:
        pipeline = Pipeline(config_from_args(args))
        report = pipeline.run()
    except (ValueError, TypeError, OSError) as error:  # bad input or files: a message
        if pipeline is None or pipeline.processes is None or pipeline.processes.is_main:
            print(f"wmss train: error: {error}", file=sys.stderr)
        return 1
    if not pipeline.processes.is_main:  # the main process reports for the launched run
        return 0
    print(json.dumps({"final_model": report["final_model"],
                      "stages": [{k: v for k, v in stage.items()
                                  if k in ("stage", "seconds", "train_loss", "active")}
                                 for stage in report["stages"]]}, indent=2))
    return 0
