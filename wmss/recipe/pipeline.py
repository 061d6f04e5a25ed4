"""The WMSS recipe end to end (the paper's Algorithm 1), resumable, one directory per stage.

    base M0 --SFT--> M1                                  sft/
    round t = 1..K:  weak = M_{t-1}, strong = M_t
        WD-DS: score the data with both, draw the active set   round-t/selection/
        WD-JT: train the pair on the active set -> M_{t+1}     round-t/train/ (checkpoints)
                                                               round-t/model/ (the new strong)

Each stage writes ``report.json`` (settings, results, timings and, for the stages that produce
a model, the means of its ``wmss.logit_stats`` over the data set) when it finishes; a rerun of the
same configuration skips finished stages and resumes an interrupted training stage from its last
complete Trainer checkpoint (a checkpoint half written when the run was killed, or when the disk
filled up, is never resumed from). ``run.json`` at the top holds the configuration and the SHA-256
of the data file; rerunning with different settings, or after the data file was edited, is
refused rather than mixing two runs in one directory. Every setting is checked when the
``PipelineConfig`` is made, and the data when the run starts, before anything is trained or
``run.json`` written, so a corrected rerun is never refused. Local paths are stored absolute, so
a rerun from another working directory means the same files. One run at a time holds the
directory (``wmss.io.directory_lock``). Every file is written atomically, and a stage's final
model directory appears only once complete. After each stage its PNG plots are drawn beside its
report from the stage's own files (``wmss.recipe.plots``: losses, entropies and mixed fraction,
the selection's entropy discrepancy and weight terms), and ``report.json`` lists them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from transformers import TrainerCallback

from .. import defaults
from ..hf.batches import Collator, pad_token_id, supervised_tokens
from ..hf.models import load_causal_lm
from ..io import atomic_write_json, directory_lock
from .data import data_sha256, encode_records, read_records
from .selection import SelectionOptions
from ..loss import LossOptions
from ..validation import check_choice, check_flag, check_int

RUN_FILE, REPORT_FILE, CHECKPOINTS_DIR = "run.json", "report.json", "checkpoints"
# Key of the report entries holding the means of wmss.logit_stats of each model a stage produced.
LOGIT_STATS_KEY = "logit_stats"
DTYPES = ("float32", "bfloat16", "float16")
# TrainingArguments the pipeline sets from its own settings (so extra_training_args may not).
PIPELINE_TRAINING_ARGS = {
    "output_dir": "output_dir", "num_train_epochs": "sft_epochs / wmss_epochs",
    "learning_rate": "learning_rate", "warmup_ratio": "warmup_ratio",
    "warmup_steps": "warmup_ratio", "max_grad_norm": "max_grad_norm",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "bf16": "bf16",
    "activation_checkpointing": "activation_checkpointing",
    "gradient_checkpointing": "activation_checkpointing", "seed": "seed",
    "save_steps": "save_steps", "logging_steps": "logging_steps", "use_cpu": "use_cpu"}
# Settings that change how a run is carried out but not what it computes: a rerun may change them.
VOLATILE_SETTINGS = ("output_dir", "logging_steps", "selection_batch_size", "backend", "use_cpu")
# Key of the run report's list of the PNG plots drawn (wmss.recipe.plots), absolute paths.
PLOTS_KEY = "plots"
# Default seconds between two progress lines of a training stage (TrainingProgress).
PROGRESS_SECONDS = 10.0


def _check_real(name: str, value, *, low: float, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        interval = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                    if math.isfinite(high) else f"{'>' if low_open else '>='} {low:g}")
        raise ValueError(f"{name} must be a finite number {'in ' if math.isfinite(high) else ''}"
                         f"{interval}, got {value}")
    return value


def _check_model_source(name: str, source: str) -> None:
    """A model path or hub name must hold a model config; ``ValueError`` naming the setting."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"{name}: no model can be loaded from {source!r} ({error})") from None


def _absolute_if_local(path: Optional[str]) -> Optional[str]:
    """A local path made absolute (so a rerun elsewhere means the same files); hub names as given."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a path or hub name, got {type(path).__name__}")
    path = os.fspath(path)
    return os.path.abspath(path) if os.path.exists(path) else path


@dataclass
class PipelineConfig:
    """Every setting of a pipeline run; paper defaults from ``wmss.defaults``.

    Start either from ``base_model`` (M0; an SFT warm-up makes M1) or from a ``weak_model`` and
    ``strong_model`` pair (no warm-up). Model fields are paths or hub names for
    ``AutoModelForCausalLM.from_pretrained``; the tokenizer comes from ``tokenizer`` or the first
    model given.
    """

    output_dir: str
    data: str
    base_model: Optional[str] = None
    weak_model: Optional[str] = None
    strong_model: Optional[str] = None
    tokenizer: Optional[str] = None
    rounds: int = defaults.ROUNDS
    lam: float = defaults.LAMBDA
    alpha: float = defaults.ALPHA
    beta: float = defaults.BETA
    gamma: float = defaults.GAMMA
    normalize: str = "paper"
    entropy_term: str = "strong"
    num_draws: Optional[int] = None
    keep_duplicates: bool = False
    gap_threshold: Optional[float] = None
    train_weak: bool = True
    sft_epochs: float = defaults.SFT_EPOCHS
    wmss_epochs: float = defaults.WMSS_EPOCHS
    learning_rate: float = defaults.LEARNING_RATE
    warmup_ratio: float = defaults.WARMUP_RATIO
    max_grad_norm: float = defaults.MAX_GRAD_NORM
    max_length: int = defaults.MAX_LENGTH
    batch_size: int = 1
    gradient_accumulation_steps: int = 8
    selection_batch_size: int = 8
    dtype: str = "float32"
    bf16: bool = False
    activation_checkpointing: bool = False
    backend: str = "auto"
    seed: int = 0
    save_steps: int = 500
    logging_steps: int = 10
    use_cpu: bool = False
    extra_training_args: dict = field(default_factory=dict)

    def __post_init__(self):
        """Checks every setting (``TypeError``/``ValueError`` naming it) before any work starts."""
        if self.base_model is None and (self.weak_model is None or self.strong_model is None):
            raise ValueError("give base_model (SFT warm-up first) or both weak_model and "
                             "strong_model")
        if self.base_model is not None and (self.weak_model or self.strong_model):
            raise ValueError("give base_model or a weak_model/strong_model pair, not both")
        for name in ("output_dir", "data"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                raise TypeError(f"{name} must be a path, got {value!r}")
        if not os.path.isfile(self.data):
            raise ValueError(f"data: no such file: {self.data}")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ValueError(f"output_dir {self.output_dir} exists and is not a directory")
        self.output_dir = os.path.abspath(self.output_dir)
        for name in ("data", "base_model", "weak_model", "strong_model", "tokenizer"):
            setattr(self, name, _absolute_if_local(getattr(self, name)))
        check_int("rounds", self.rounds, 0)
        if self.rounds == 0 and self.base_model is None:
            raise ValueError("rounds must be >= 1 (or 0 with base_model: SFT only), got 0")
        loss = self.loss_options()  # lam, gap_threshold, train_weak, backend: the loss's checks
        self.lam, self.gap_threshold = loss.lam, loss.gap_threshold
        if self.gap_threshold is not None and not math.isfinite(self.gap_threshold):
            raise ValueError(f"gap_threshold must be finite or None (no gap masking), got "
                             f"{self.gap_threshold}")
        self.selection_options()  # alpha, beta, gamma, normalize, entropy_term, draws, seed
        for name in ("sft_epochs", "wmss_epochs", "learning_rate"):
            setattr(self, name, _check_real(name, getattr(self, name), low=0.0, low_open=True))
        self.warmup_ratio = _check_real("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0,
                                        high_open=True)
        self.max_grad_norm = _check_real("max_grad_norm", self.max_grad_norm, low=0.0)
        check_int("max_length", self.max_length, 2)  # one input and one target at least
        for name in ("batch_size", "gradient_accumulation_steps", "selection_batch_size",
                     "save_steps", "logging_steps"):
            check_int(name, getattr(self, name), 1)
        check_choice("dtype", self.dtype, DTYPES)
        for name in ("bf16", "activation_checkpointing", "use_cpu"):
            check_flag(name, getattr(self, name))
        if not isinstance(self.extra_training_args, dict):
            raise TypeError("extra_training_args must be a dict of TrainingArguments fields, got "
                            f"{type(self.extra_training_args).__name__}")
        from transformers import TrainingArguments

        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        unknown = sorted(set(self.extra_training_args) - fields)
        if unknown:
            raise ValueError(f"extra_training_args: not TrainingArguments fields: {unknown}")
        own = sorted(set(self.extra_training_args) & set(PIPELINE_TRAINING_ARGS))
        if own:
            raise ValueError(f"extra_training_args: {own} are set by the pipeline; use the "
                             "setting of their own instead: "
                             + ", ".join(f"{k} -> {PIPELINE_TRAINING_ARGS[k]}" for k in own))

    def loss_options(self) -> LossOptions:
        """The joint training's loss options (checked: ``LossOptions`` raises on a bad one)."""
        return LossOptions(lam=self.lam, train_weak=self.train_weak,
                           gap_threshold=self.gap_threshold, backend=self.backend)

    def selection_options(self) -> SelectionOptions:
        """The WD-DS options of every round (validated by ``SelectionOptions``)."""
        return SelectionOptions(alpha=self.alpha, beta=self.beta, gamma=self.gamma,
                                normalize=self.normalize, entropy_term=self.entropy_term,
                                num_draws=self.num_draws, seed=self.seed,
                                keep_duplicates=self.keep_duplicates)

    def fingerprint(self) -> dict:
        """The settings that define the run (a rerun must match them to continue)."""
        settings = dataclasses.asdict(self)
        for volatile in VOLATILE_SETTINGS:
            settings.pop(volatile)
        return settings


def _read_json(path: str, kind: type = dict):
    """The JSON document at ``path`` (None if absent); a damaged one is a ``ValueError`` naming it."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError) as error:
        document, problem = None, str(error)
    else:
        problem = None if isinstance(document, kind) else f"not a JSON {kind.__name__}"
    if problem is not None:
        raise ValueError(f"{path} is damaged ({problem}); it is wmss's own record of the run: "
                         f"delete {os.path.dirname(path)} to redo that part, or start a new "
                         "output directory")
    return document


def _read_active(path: str, size: int) -> list[int]:
    """A selection stage's active indices, checked against the data set's ``size``."""
    active = _read_json(path, list)
    if active is None or not active or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size for i in active):
        raise ValueError(f"{path} is damaged (not a non-empty list of record indices below "
                         f"{size}); delete {os.path.dirname(path)} to redo the selection")
    return active


def _save_model_atomically(model, tokenizer, final_dir: str) -> None:
    """Write a model (and tokenizer) to a sibling temp dir, then rename it into place."""
    partial = final_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if os.path.exists(final_dir):  # an earlier attempt died between rename and report
        shutil.rmtree(final_dir)
    os.replace(partial, final_dir)


def _duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"`` or ``"1 h 02 min"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class TrainingProgress(TrainerCallback):
    """Progress lines of one training stage through ``log``: one when training starts, one after
    the first optimizer step, then at most one every ``every_seconds`` and one at the last step::

        [wmss] sft: step 120/1125 (8.3 steps/s, 2 min 01 s left)

    The rate is over the steps this process has run (a resumed stage does not count the steps
    of its checkpoint), and the time left is the remaining steps at that rate. ``clock`` (a
    ``time.monotonic``-like function) is there for tests.
    """

    def __init__(self, stage: str, log: Callable[[str], None],
                 every_seconds: float = PROGRESS_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.log, self.clock = stage, log, clock
        self.every_seconds = _check_real("every_seconds", every_seconds, low=0.0)
        self.start_time = self.last_time = None
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = self.last_time = self.clock()
        self.start_step = state.global_step
        resumed = f", resuming after step {state.global_step}" if state.global_step else ""
        self.log(f"[wmss] {self.stage}: training, {state.max_steps} optimizer steps{resumed}")

    def on_step_end(self, args, state, control, **kwargs):
        now, done = self.clock(), state.global_step - self.start_step
        if done <= 0:
            return
        last = state.global_step >= state.max_steps
        if not (done == 1 or last or now - self.last_time >= self.every_seconds):
            return
        self.last_time = now
        elapsed = now - self.start_time
        rate = done / elapsed if elapsed > 0 else float("inf")
        left = (state.max_steps - state.global_step) / rate if math.isfinite(rate) else 0.0
        shown = f"{rate:.1f} steps/s" if math.isfinite(rate) else "- steps/s"
        self.log(f"[wmss] {self.stage}: step {state.global_step}/{state.max_steps} ({shown}, "
                 f"{_duration(left)} left)")


class Pipeline:
    """Runs ``PipelineConfig``; ``run()`` returns the final report (also in ``report.json``).

    ``log`` receives one line per stage event; ``verbose=False`` also silences the Trainer's
    per-step log lines and transformers' progress bars. ``progress_seconds``: also a progress
    line of each training stage at most every that many seconds (``TrainingProgress``; None:
    none). After each stage its plots are drawn (``wmss.recipe.plots``) and listed in the run
    report under ``"plots"``; without matplotlib one line says they were skipped.
    """

    def __init__(self, config: PipelineConfig, log: Callable[[str], None] = print,
                 verbose: bool = True, progress_seconds: Optional[float] = None):
        self.config, self.log, self.verbose = config, log, verbose
        self.progress_seconds = (None if progress_seconds is None else
                                 _check_real("progress_seconds", progress_seconds, low=0.0))
        self.root = config.output_dir
        self.tokenizer = None
        self.dataset = None
        self.plots: list[str] = []
        self._plots_skipped = False

    # ---- setup -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Check the data and the directory's earlier run, then record this run in ``run.json``.

        Everything that can refuse the run happens before ``run.json`` is written, so a run
        refused for bad data can be rerun once the data is fixed.
        """
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not self.verbose:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()

        c = self.config
        # As JSON stores it (tuples become lists), so that an identical rerun compares equal.
        wanted = json.loads(json.dumps({"config": c.fingerprint(),
                                        "data_sha256": data_sha256(c.data)}))
        existing = _read_json(os.path.join(self.root, RUN_FILE))
        if existing is not None:
            if existing.get("config") != wanted["config"]:
                old = existing.get("config") or {}
                changed = sorted(k for k in wanted["config"] if old.get(k) != wanted["config"][k])
                raise ValueError(f"{self.root} holds a run with other settings "
                                 f"({', '.join(changed)}); use a new output directory to start "
                                 "another run")
            if existing.get("data_sha256") != wanted["data_sha256"]:
                raise ValueError(f"the data file {c.data} changed since the run in {self.root} "
                                 "started (its SHA-256 differs); the run's stages index its "
                                 "records, so restore the file or start a new output directory")
        records = read_records(c.data)  # before any download: errors name file:line
        for name in ("base_model", "weak_model", "strong_model"):
            if getattr(c, name) is not None:
                _check_model_source(name, getattr(c, name))
        source_name = next(n for n in ("tokenizer", "base_model", "strong_model")
                           if getattr(c, n) is not None)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(getattr(c, source_name))
        except (OSError, ValueError) as error:
            raise ValueError(f"{source_name}: no tokenizer can be loaded from "
                             f"{getattr(c, source_name)!r} ({error})") from None
        self.dataset = encode_records(records, self.tokenizer, c.max_length)
        if not any(supervised_tokens(example) for example in self.dataset):
            raise ValueError(f"{c.data}: no record has a supervised token after encoding with "
                             f"max_length={c.max_length} (prompts fill every sequence, or "
                             "nothing is marked for training): there is nothing to train on")
        try:  # a dry run: values TrainingArguments refuses fail now, not after the SFT
            self._training_args(os.path.join(self.root, CHECKPOINTS_DIR), c.sft_epochs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"extra_training_args: TrainingArguments refuses them: "
                             f"{error}") from None
        if existing is None:
            atomic_write_json(os.path.join(self.root, RUN_FILE), wanted, indent=2)
        self.log(f"[wmss] {len(self.dataset)} examples from {c.data}")

    def _training_args(self, output_dir: str, epochs: float):
        from ..hf.trainer import training_arguments

        c = self.config
        return training_arguments(
            output_dir, num_train_epochs=epochs, learning_rate=c.learning_rate,
            warmup_ratio=c.warmup_ratio, max_grad_norm=c.max_grad_norm,
            per_device_train_batch_size=c.batch_size,
            gradient_accumulation_steps=c.gradient_accumulation_steps, bf16=c.bf16,
            activation_checkpointing=c.activation_checkpointing, seed=c.seed,
            save_steps=c.save_steps, logging_steps=c.logging_steps, use_cpu=c.use_cpu,
            **{"save_strategy": "steps", "save_total_limit": 2, "weight_decay": 0.0,
               "disable_tqdm": True, **c.extra_training_args})

    def _train(self, trainer, checkpoints: str):
        """``trainer.train()``, resuming from the stage's last complete checkpoint if any."""
        from transformers import PrinterCallback

        from ..hf.trainer import (CompleteCheckpointMarker, last_complete_checkpoint,
                              set_aside_incomplete_checkpoints)

        if not self.verbose:
            trainer.remove_callback(PrinterCallback)
        if not any(isinstance(cb, CompleteCheckpointMarker)
                   for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(CompleteCheckpointMarker())  # the SFT stage's plain Trainer
        if self.progress_seconds is not None:
            stage = os.path.relpath(os.path.dirname(checkpoints), self.root).replace(os.sep, "/")
            trainer.add_callback(TrainingProgress(stage, self.log, self.progress_seconds))
        resume = last_complete_checkpoint(checkpoints)
        # A save interrupted by a kill or a full disk left a newer checkpoint without the marker:
        # moved aside, so the resumed run's save of that step does not write into it.
        step = int(resume.rsplit("-", 1)[1]) if resume else 0
        set_aside_incomplete_checkpoints(checkpoints, after_step=step)
        return trainer.train(resume_from_checkpoint=resume)

    def _stage(self, name: str, work: Callable[[str], dict]) -> dict:
        """Run ``work(stage_dir)`` unless the stage already finished; record its report."""
        stage_dir = os.path.join(self.root, name)
        report_path = os.path.join(stage_dir, REPORT_FILE)
        done = _read_json(report_path)
        if done is not None:
            self.log(f"[wmss] {name}: done earlier, skipped")
            self._plot(name, stage_dir, done)
            return done
        os.makedirs(stage_dir, exist_ok=True)
        self.log(f"[wmss] {name}: running")
        start = time.perf_counter()
        report = {"stage": name, **work(stage_dir)}
        report["seconds"] = round(time.perf_counter() - start, 3)
        atomic_write_json(report_path, report, indent=2)
        # Only now: a kill before the report was written resumes from these checkpoints.
        shutil.rmtree(os.path.join(stage_dir, CHECKPOINTS_DIR), ignore_errors=True)
        self.log(f"[wmss] {name}: done in {_duration(report['seconds'])}")
        self._plot(name, stage_dir, report)
        return report

    def _plot(self, name: str, stage_dir: str, report: dict) -> None:
        """Draw a finished stage's plots from its report and files (``wmss.recipe.plots``);
        a plot never stops the run: a missing matplotlib or a failed plot is one log line."""
        from . import plots

        if self._plots_skipped:
            return
        reason = plots.plotting_unavailable()
        if reason is not None:
            self._plots_skipped = True
            self.log(f"[wmss] plots skipped: {reason}")
            return
        try:
            drawn = plots.plot_stage(stage_dir, report)
        except Exception as error:  # noqa: BLE001 - the run's results matter more than a plot
            self.log(f"[wmss] {name}: plots skipped ({type(error).__name__}: {error})")
            return
        self.plots += [os.path.join(stage_dir, file) for file in drawn]

    def _logit_stats(self, model) -> dict:
        """The means of ``wmss.logit_stats`` of a model this run produced (the SFT model, each
        round's strong model) over the whole data set's supervised tokens, for its stage report
        (``wmss.recipe.inspect.inspect_models``; no ``[tokens, vocab]`` logits)."""
        from .inspect import inspect_models

        c = self.config
        result = inspect_models(model, self.dataset, batch_size=c.selection_batch_size,
                                pad_token_id=pad_token_id(self.tokenizer), backend=c.backend)
        return {"supervised_tokens": result["supervised_tokens"], **result["means"]["strong"]}

    # ---- stages ------------------------------------------------------------------------------

    def _sft(self, stage_dir: str, base: str) -> dict:
        from transformers import Trainer

        model = load_causal_lm(base, self.config.dtype)
        checkpoints = os.path.join(stage_dir, CHECKPOINTS_DIR)
        trainer = Trainer(model=model, args=self._training_args(checkpoints, self.config.sft_epochs),
                          train_dataset=self.dataset, processing_class=self.tokenizer,
                          data_collator=Collator(pad_token_id(self.tokenizer)))
        result = self._train(trainer, checkpoints)
        _save_model_atomically(model, self.tokenizer, os.path.join(stage_dir, "model"))
        return {"model": os.path.join(stage_dir, "model"), "base": base,
                "train_loss": result.training_loss, "steps": result.global_step,
                LOGIT_STATS_KEY: self._logit_stats(model), "log": trainer.state.log_history}

    def _select(self, stage_dir: str, weak: str, strong: str) -> dict:
        """WD-DS, the same flow and files as ``wmss select`` (scores, active set, summary)."""
        from . import selection

        c = self.config
        strong_model, weak_model = load_causal_lm(strong, c.dtype), load_causal_lm(weak, c.dtype)
        if torch.cuda.is_available() and not c.use_cpu:
            strong_model, weak_model = strong_model.cuda(), weak_model.cuda()
        scores = selection.score_dataset(
            strong_model, weak_model, self.dataset, batch_size=c.selection_batch_size,
            pad_token_id=pad_token_id(self.tokenizer),
            output=os.path.join(stage_dir, selection.SCORES_FILE), backend=c.backend,
            progress=False)
        del strong_model, weak_model
        chosen = selection.select_active(scores, c.selection_options())
        selection.save_selection(chosen, stage_dir, extra_summary={
            "data": c.data, "models": {"strong": strong, "weak": weak}})
        self.log(f"[wmss] selected {len(chosen.active)} of {len(self.dataset)} examples")
        return {"weak": weak, "strong": strong, "active": len(chosen.active),
                "summary": chosen.summary}

    def _joint_train(self, stage_dir: str, weak: str, strong: str, active: list[int]) -> dict:
        from ..hf.pair import apply_wmss
        from ..hf.trainer import WMSSTrainer

        c = self.config
        pair = apply_wmss(load_causal_lm(strong, c.dtype), load_causal_lm(weak, c.dtype),
                          lam=c.lam, train_weak=c.train_weak, gap_threshold=c.gap_threshold,
                          backend=c.backend)
        checkpoints = os.path.join(stage_dir, CHECKPOINTS_DIR)
        trainer = WMSSTrainer(pair, self._training_args(checkpoints, c.wmss_epochs),
                              train_dataset=[self.dataset[i] for i in active],
                              processing_class=self.tokenizer)
        result = self._train(trainer, checkpoints)
        model_dir = os.path.join(os.path.dirname(stage_dir), "model")
        _save_model_atomically(pair, self.tokenizer, model_dir)
        return {"weak": weak, "strong": strong, "model": model_dir,
                "train_loss": result.training_loss, "steps": result.global_step,
                LOGIT_STATS_KEY: self._logit_stats(pair.strong), "log": trainer.state.log_history}

    def run(self) -> dict:
        """Every stage not finished yet, holding the output directory's lock throughout."""
        with directory_lock(self.root, "wmss train"):
            return self._run()

    def _run(self) -> dict:
        from .selection import ACTIVE_FILE

        self._prepare()
        c = self.config
        stages = []
        self.plots, self._plots_skipped = [], False
        if c.base_model is not None:
            sft = self._stage("sft", lambda d: self._sft(d, c.base_model))
            stages.append(sft)
            weak, strong = c.base_model, sft["model"]
        else:
            weak, strong = c.weak_model, c.strong_model
        for t in range(1, c.rounds + 1):
            selection = self._stage(f"round-{t}/selection",
                                    lambda d: self._select(d, weak, strong))
            active = _read_active(os.path.join(self.root, f"round-{t}", "selection",
                                               ACTIVE_FILE), len(self.dataset))
            trained = self._stage(f"round-{t}/train",
                                  lambda d: self._joint_train(d, weak, strong, active))
            stages += [selection, trained]
            weak, strong = strong, trained["model"]
        # Round by round, the statistics of each model produced (stages finished by an older
        # wmss have none).
        produced = [{"stage": s["stage"], "model": s["model"], **s[LOGIT_STATS_KEY]}
                    for s in stages if LOGIT_STATS_KEY in s]
        report = {"config": c.fingerprint(), "final_model": strong, LOGIT_STATS_KEY: produced,
                  PLOTS_KEY: list(self.plots),
                  "stages": [{k: v for k, v in s.items() if k != "log"} for s in stages]}
        atomic_write_json(os.path.join(self.root, REPORT_FILE), report, indent=2)
        if self.plots:
            self.log("[wmss] plots: " + ", ".join(os.path.relpath(p, self.root)
                                                  for p in self.plots))
        self.log(f"[wmss] done: final strong model in {strong}")
        return report
