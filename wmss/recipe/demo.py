"""The built-in demo: WMSS against plain SFT at the same epoch budget, on a task made on the spot.

Task: multi-digit addition written as text, with fixed-width operands and the sum reversed
("57+38=" -> "590" for 095), a character tokenizer and a tiny Llama (nothing is downloaded). As in
the paper, the weak model is a *pretrained* base: M0 is the random initialisation trained for one
epoch on plain arithmetic text ("57+38=95", every token supervised), which teaches it the symbols
and sums but not the task's format. From that same M0:

* **SFT**: two SFT epochs;
* **WMSS**: one SFT epoch (M1), then one WMSS round (WD-DS selection with weak=M0, strong=M1,
  and joint training of the pair on the active set), through ``wmss.pipeline``.

Both are evaluated by exact match of greedy completions on held-out problems. The learning rate is
the toy's (1e-3 from scratch), not the paper's 1e-5; everything else is the paper's default. The
demo reports what it measures; it is not tuned to make either side win. One thing to know when
reading it: a model this small learns the task abruptly after roughly a thousand optimizer steps,
so with much less data per epoch (``--train-size``) an arm can stop just short of that transition
and score near zero; the default size puts both arms past it.

``seeds=K`` repeats the whole comparison (data, initialisation, training) for seeds ``seed`` to
``seed + K - 1``, one folder each (``seed-<s>/``, with its ``result.json``), and reports the mean
and the sample standard deviation of both arms' held-out exact match and held-out loss
(``demo_result.json``, ``comparison.png``). Each arm's final model also gets the means of its
``wmss.logit_stats`` over the training set (from the pipeline reports), printed side by side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..hf.batches import collate
from ..hf.models import load_causal_lm
from ..io import atomic_write_json, atomic_write_text
from ..validation import check_int
from .data import encode_records
from .pipeline import LOGIT_STATS_KEY, PROGRESS_SECONDS, Pipeline, PipelineConfig
from .toy import char_tokenizer, tiny_causal_lm


SETTINGS_FILE = "demo.json"
RESULT_FILE = "result.json"            # per seed, in seed-<s>/
SUMMARY_FILE = "demo_result.json"      # every seed, their mean and spread
COMPARISON_PLOT = "comparison.png"
ARMS = ("sft", "wmss")
ARM_NAMES = {"sft": "SFT", "wmss": "WMSS"}
METRICS = ("accuracy", "loss")         # held-out exact match, held-out loss (nats per token)
MAX_LENGTH = 64                        # far above the longest record (2 * digits + 6 tokens)


def seed_dir_name(seed: int) -> str:
    return f"seed-{seed}"


@dataclass
class DemoSettings:
    """Sizes of the demo (checked when made: ``ValueError``/``TypeError`` naming the field).

    ``seeds``: how many seeds the comparison is run for (``seed``, ``seed + 1``, ...).
    """

    train_size: int = 9000
    pretrain_size: int = 4000
    eval_size: int = 400
    digits: int = 2
    hidden_size: int = 128
    num_layers: int = 2
    batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    seeds: int = 1

    def __post_init__(self):
        for name in ("train_size", "eval_size", "digits", "hidden_size", "num_layers",
                     "batch_size", "seeds"):
            check_int(name, getattr(self, name), 1)
        for name in ("pretrain_size", "seed"):
            check_int(name, getattr(self, name), 0)
        if (isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, (int, float))
                or not math.isfinite(self.learning_rate) or self.learning_rate <= 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got "
                             f"{self.learning_rate!r}")


@dataclass
class DemoResult:
    """One seed's comparison: held-out exact match (share in [0, 1]) and held-out loss (mean
    nats per answer token, teacher forced) of each arm's final model, the active set's size,
    and each arm's final ``logit_stats`` means over the training set."""

    seed: int
    sft_accuracy: float
    wmss_accuracy: float
    sft_loss: float
    wmss_loss: float
    eval_size: int
    active_size: int
    train_size: int
    seconds: float
    logit_stats: dict = field(default_factory=dict)

    def summary_line(self) -> str:
        diff = 100 * (self.wmss_accuracy - self.sft_accuracy)
        return (f"WMSS (1 SFT epoch + 1 WMSS epoch on {self.active_size}/{self.train_size} "
                f"selected examples): {100 * self.wmss_accuracy:.1f}% exact match | SFT (2 epochs): "
                f"{100 * self.sft_accuracy:.1f}% | difference {diff:+.1f} points on "
                f"{self.eval_size} held-out problems | held-out loss WMSS {self.wmss_loss:.4f}, "
                f"SFT {self.sft_loss:.4f} nats/token")


def _mean_and_spread(values: list) -> tuple:
    """The mean and the sample standard deviation (n - 1; None for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class DemoSummary:
    """Every seed's ``DemoResult`` and, per arm and metric, their mean and sample standard
    deviation (``mean[arm][metric]``, ``std[arm][metric]``; std None with one seed).

    ``sft_accuracy``, ``wmss_accuracy`` (the means), ``eval_size``, ``train_size`` and
    ``active_size`` (the mean active set) read like one ``DemoResult``'s.
    """

    runs: list
    seconds: float
    plot: Optional[str] = None
    mean: dict = field(init=False)
    std: dict = field(init=False)

    def __post_init__(self):
        self.mean, self.std = {}, {}
        for arm in ARMS:
            self.mean[arm], self.std[arm] = {}, {}
            for metric in METRICS:
                values = [getattr(run, f"{arm}_{metric}") for run in self.runs]
                self.mean[arm][metric], self.std[arm][metric] = _mean_and_spread(values)

    @property
    def sft_accuracy(self) -> float:
        return self.mean["sft"]["accuracy"]

    @property
    def wmss_accuracy(self) -> float:
        return self.mean["wmss"]["accuracy"]

    @property
    def eval_size(self) -> int:
        return self.runs[0].eval_size

    @property
    def train_size(self) -> int:
        return self.runs[0].train_size

    @property
    def active_size(self) -> float:
        return statistics.fmean(run.active_size for run in self.runs)

    def to_json(self) -> dict:
        return {"seeds": [run.seed for run in self.runs], "seconds": round(self.seconds, 3),
                "mean": self.mean, "std": self.std, "plot": self.plot,
                "runs": [dataclasses.asdict(run) for run in self.runs]}

    def summary_line(self) -> str:
        """One seed: its ``DemoResult.summary_line``; more: the means and spreads."""
        if len(self.runs) == 1:
            return self.runs[0].summary_line()

        def shown(arm, metric, scale, digits):
            spread = self.std[arm][metric]
            return (f"{scale * self.mean[arm][metric]:.{digits}f} +- "
                    f"{scale * spread:.{digits}f}")

        diffs = [100 * (run.wmss_accuracy - run.sft_accuracy) for run in self.runs]
        diff, diff_std = _mean_and_spread(diffs)
        return (f"over {len(self.runs)} seeds (mean +- sample std): WMSS (1 SFT epoch + 1 WMSS "
                f"epoch on {self.active_size:.0f}/{self.train_size} selected examples on "
                f"average): {shown('wmss', 'accuracy', 100, 1)}% exact match | SFT (2 epochs): "
                f"{shown('sft', 'accuracy', 100, 1)}% | difference {diff:+.1f} +- "
                f"{diff_std:.1f} points on {self.eval_size} held-out problems | held-out loss "
                f"WMSS {shown('wmss', 'loss', 1, 4)}, SFT {shown('sft', 'loss', 1, 4)} nats/token")

    def per_seed_lines(self) -> list:
        return [f"seed {run.seed}: WMSS {100 * run.wmss_accuracy:.1f}% / loss "
                f"{run.wmss_loss:.4f}, SFT {100 * run.sft_accuracy:.1f}% / loss "
                f"{run.sft_loss:.4f} ({run.active_size} selected)" for run in self.runs]

    def logit_stats_table(self) -> str:
        """Both arms' final ``logit_stats`` means over the training set (mean over seeds)."""
        from .inspect import STATISTICS, format_table

        means = {ARM_NAMES[arm]: {name: statistics.fmean(run.logit_stats[arm][name]
                                                         for run in self.runs)
                                  for name in STATISTICS} for arm in ARMS}
        tokens = self.runs[0].logit_stats["sft"]["supervised_tokens"]
        table = format_table({"means": means, "supervised_tokens": tokens,
                              "examples": self.train_size, "lam": None})
        over = f" (mean over {len(self.runs)} seeds)" if len(self.runs) > 1 else ""
        return (f"logit statistics of each arm's final model on its training set{over}:\n"
                f"{table}")


def addition_problems(count: int, digits: int, rng: random.Random, exclude=frozenset()) -> list:
    """``count`` distinct ``(a, b)`` pairs with up to ``digits`` digits, none in ``exclude``."""
    top = 10 ** digits
    if count > top * top - len(exclude):
        raise ValueError(f"only {top * top - len(exclude)} distinct problems with {digits} digits")
    seen, problems = set(exclude), []
    while len(problems) < count:
        pair = (rng.randrange(top), rng.randrange(top))
        if pair not in seen:
            seen.add(pair)
            problems.append(pair)
    return problems


def _record(a: int, b: int, digits: int) -> dict:
    """Fixed-width operands and a reversed, fixed-width sum ("07+38=" -> "540" for 045): each
    answer digit then depends on aligned input digits and one carry, which tiny models learn."""
    width = digits + 1
    return {"prompt": f"{a:0{digits}d}+{b:0{digits}d}=", "completion": f"{a + b:0{width}d}"[::-1]}


@torch.no_grad()
def exact_match(model, tokenizer, problems, digits: int, batch_size: int = 64) -> float:
    """Share of problems whose greedy completion is exactly the answer (left-padded batches)."""
    model.eval()
    correct = 0
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        records = [_record(a, b, digits) for a, b in chunk]
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in records]
        width = max(map(len, prompts))
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=digits + 2, pad_token_id=pad, eos_token_id=eos)
        for record, row in zip(records, out[:, width:]):
            text = tokenizer.decode([t for t in row.tolist() if t not in (pad, eos)])
            correct += text == record["completion"]
    return correct / len(problems)


@torch.no_grad()
def held_out_loss(model, tokenizer, problems, digits: int, batch_size: int = 64) -> float:
    """Mean cross-entropy (nats) per supervised token (the answer and its EOS, as trained) of
    the problems under teacher forcing: float64 sum over tokens / token count."""
    model.eval()
    examples = encode_records([_record(a, b, digits) for a, b in problems], tokenizer, MAX_LENGTH)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1),
            ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    return total / count


def _check_kept_directory(output_dir: str, wanted: dict) -> None:
    """A kept --output-dir holds one demo: another one's settings would rewrite its data files
    under its finished stages, so it is refused before anything is written."""
    settings_path = os.path.join(output_dir, SETTINGS_FILE)
    if os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as handle:
            held = json.load(handle)
        if held != wanted:
            changed = sorted(k for k in wanted if held.get(k) != wanted[k])
            raise ValueError(f"{output_dir} holds a demo with other settings "
                             f"({', '.join(changed)}); use another --output-dir")
    else:
        atomic_write_json(settings_path, wanted, indent=2)


def _run_seed(seed_dir: str, s: DemoSettings, seed: int, log: Callable[[str], None],
              progress: Optional[Callable[[str], None]]) -> DemoResult:
    """One seed's data, base model, both arms and their evaluation, in ``seed_dir``."""
    start = time.perf_counter()
    rng = random.Random(seed)
    os.makedirs(seed_dir, exist_ok=True)
    tokenizer = char_tokenizer()
    init = os.path.join(seed_dir, "init")
    tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=s.hidden_size,
                   num_layers=s.num_layers, seed=seed).save_pretrained(init)
    tokenizer.save_pretrained(init)

    train = addition_problems(s.train_size, s.digits, rng)
    held_out = addition_problems(s.eval_size, s.digits, rng, exclude=frozenset(train))
    pretrain = addition_problems(s.pretrain_size, s.digits, rng, exclude=frozenset(held_out))
    data, pretrain_data = (os.path.join(seed_dir, name) for name in ("train.jsonl",
                                                                    "pretrain.jsonl"))
    atomic_write_text(data, "".join(json.dumps(_record(a, b, s.digits)) + "\n" for a, b in train))
    atomic_write_text(pretrain_data, "".join(json.dumps({"text": f"{a}+{b}={a + b}"}) + "\n"
                                             for a, b in pretrain))
    settings = dict(learning_rate=s.learning_rate, batch_size=s.batch_size,
                    gradient_accumulation_steps=1, max_length=MAX_LENGTH, seed=seed,
                    use_cpu=not torch.cuda.is_available(), logging_steps=100)

    def pipeline(arm: str, config: PipelineConfig) -> dict:
        label = f"[demo] seed {seed}, {arm} | "
        shown = ((lambda line: progress(label + line.removeprefix("[wmss] ")))
                 if progress is not None else (lambda line: None))
        return Pipeline(config, log=shown, verbose=False,
                        progress_seconds=None if progress is None else PROGRESS_SECONDS).run()

    base = init
    if s.pretrain_size:
        log(f"[demo] seed {seed}: base model M0, 1 epoch on {s.pretrain_size} lines of plain "
            "arithmetic text")
        base = pipeline("base M0", PipelineConfig(
            output_dir=os.path.join(seed_dir, "pretrain"), rounds=0, data=pretrain_data,
            base_model=init, **settings))["final_model"]
    common = dict(data=data, base_model=base, **settings)
    log(f"[demo] seed {seed}: SFT arm, 2 epochs")
    sft = pipeline("SFT arm", PipelineConfig(
        output_dir=os.path.join(seed_dir, "sft-2-epochs"), rounds=0, sft_epochs=2, **common))
    log(f"[demo] seed {seed}: WMSS arm, 1 SFT epoch, then WD-DS selection and 1 WMSS epoch")
    wmss = pipeline("WMSS arm", PipelineConfig(
        output_dir=os.path.join(seed_dir, "sft-1-wmss-1"), rounds=1, sft_epochs=1,
        wmss_epochs=1, **common))

    log(f"[demo] seed {seed}: evaluating both arms on {s.eval_size} held-out problems")
    scores = {}
    for arm, report in (("sft", sft), ("wmss", wmss)):
        model = load_causal_lm(report["final_model"])
        scores[arm] = (exact_match(model, tokenizer, held_out, s.digits),
                       held_out_loss(model, tokenizer, held_out, s.digits))
    selection = next(st for st in wmss["stages"] if st["stage"].endswith("selection"))
    result = DemoResult(
        seed=seed, sft_accuracy=scores["sft"][0], wmss_accuracy=scores["wmss"][0],
        sft_loss=scores["sft"][1], wmss_loss=scores["wmss"][1], eval_size=s.eval_size,
        active_size=selection["active"], train_size=s.train_size,
        seconds=time.perf_counter() - start,
        logit_stats={"sft": sft[LOGIT_STATS_KEY][-1], "wmss": wmss[LOGIT_STATS_KEY][-1]})
    atomic_write_json(os.path.join(seed_dir, RESULT_FILE), dataclasses.asdict(result), indent=2)
    log(f"[demo] seed {seed}: WMSS {100 * result.wmss_accuracy:.1f}%, SFT "
        f"{100 * result.sft_accuracy:.1f}% exact match ({result.seconds:.0f} s)")
    return result


def run_demo(output_dir: str, settings: DemoSettings = DemoSettings(),
             log: Callable[[str], None] = print,
             progress: Optional[Callable[[str], None]] = None) -> DemoSummary:
    """Build the task and the base model, train both arms, evaluate both, for every seed.

    ``log`` gets the demo's own lines (one per stage of each seed), ``progress`` (None: none)
    the pipelines' stage lines and a progress line of each training stage (step, rate, time
    left) at most every ``PROGRESS_SECONDS``. Writes ``seed-<s>/`` per seed, then
    ``demo_result.json`` and ``comparison.png`` (skipped, with a line, without matplotlib) in
    ``output_dir``.
    """
    from transformers.utils import logging as hf_logging

    from . import plots

    if not isinstance(settings, DemoSettings):
        raise TypeError(f"settings must be a DemoSettings, got {type(settings).__name__}")
    hf_logging.set_verbosity_error()  # the demo prints its own progress lines
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    s = settings
    os.makedirs(output_dir, exist_ok=True)
    _check_kept_directory(output_dir, dataclasses.asdict(s))
    seeds = list(range(s.seed, s.seed + s.seeds))
    log(f"[demo] {s.train_size} training and {s.eval_size} held-out {s.digits}-digit additions; "
        f"tiny Llama d={s.hidden_size}, {s.num_layers} layers; seed"
        f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; in {output_dir}")
    runs = [_run_seed(os.path.join(output_dir, seed_dir_name(seed)), s, seed, log, progress)
            for seed in seeds]
    summary = DemoSummary(runs, seconds=time.perf_counter() - start)
    reason = plots.plotting_unavailable()
    if reason is None:
        path = os.path.join(output_dir, COMPARISON_PLOT)
        try:
            plots.plot_demo_comparison(path, summary.to_json())
            summary.plot = path
        except Exception as error:  # noqa: BLE001 - the results matter more than the picture
            log(f"[demo] comparison plot skipped ({type(error).__name__}: {error})")
    else:
        log(f"[demo] comparison plot skipped: {reason}")
    atomic_write_json(os.path.join(output_dir, SUMMARY_FILE), summary.to_json(), indent=2)
    return summary
