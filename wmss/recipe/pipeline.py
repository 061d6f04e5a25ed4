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

Launched on several processes (``torchrun`` or ``accelerate launch``), every process runs every
stage: training is Trainer's data parallelism (DDP, or FSDP2 / DeepSpeed ZeRO-3 with
``fsdp_config`` / ``deepspeed_config``), selection scores each process's share of the data set
(examples ``rank::world``, each in a scores file of its own while it runs) and the main process
merges the shares. Otherwise only the main process writes the run's files (``run.json``, reports,
scores, selections, plots, models, logs) and holds the lock; the others wait for it at each stage's start and end, and an error it meets is raised on
every process (no process is left waiting for one that failed).
"""

from __future__ import annotations

import contextlib
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
# In a training stage's checkpoints folder: the process count its checkpoints were written by.
PROCESSES_FILE = "processes.json"
# Key of the report entries holding the means of wmss.logit_stats of each model a stage produced.
LOGIT_STATS_KEY = "logit_stats"
# Key of a training stage's report entry saying how it ran (Pipeline._parallelism).
PARALLELISM_KEY = "parallelism"
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
    "save_steps": "save_steps", "logging_steps": "logging_steps", "use_cpu": "use_cpu",
    "fsdp": "fsdp_config", "fsdp_config": "fsdp_config", "deepspeed": "deepspeed_config"}
# Settings that change how a run is carried out but not what it computes: a rerun may change them.
VOLATILE_SETTINGS = ("output_dir", "logging_steps", "selection_batch_size", "backend", "use_cpu")
# Key of the run report's list of the PNG plots drawn (wmss.recipe.plots), absolute paths.
PLOTS_KEY = "plots"
# A launched selection's per-process scores files: SCORES_FILE + SHARE_INFIX + "R-of-N".
SHARE_INFIX = ".process-"
# Name of the weak model's adapter in a LoRA run's PEFT model (the strong one is "default").
LORA_WEAK_ADAPTER = "weak"
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


def fsdp_runs_here(use_cpu: bool) -> bool:
    """Whether accelerate would run FSDP for this run: on GPUs only (``AcceleratorState`` keeps
    its FSDP plugin for GPU-like devices and prepares DDP on CPUs). Tests that run FSDP on CPUs
    replace it (see tests/pipeline_worker.py)."""
    return not use_cpu and torch.cuda.is_available()


def _check_parallelism_config(name: str, value) -> Optional[str | dict]:
    """``fsdp_config``/``deepspeed_config``: None, a dict, or the absolute path of a JSON file
    holding an object (checked here, so a typo fails before anything is trained)."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a JSON file's path or a dict, got {type(value).__name__}")
    path = os.path.abspath(os.fspath(value))
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{name}: {path} is not a readable JSON file ({error})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{name}: {path} holds a JSON {type(document).__name__}, not an object")
    return path


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

    ``fsdp_config`` (FSDP2, GPUs only) or ``deepspeed_config`` (e.g. ZeRO-3): a JSON file or a
    dict, given to ``TrainingArguments`` as its ``fsdp_config`` (with ``fsdp`` on) or
    ``deepspeed``; ``examples/`` holds one of each. Launch with ``torchrun`` or
    ``accelerate launch`` (see the README).

    ``lora_rank``: train LoRA adapters (PEFT) instead of whole models, the pair on one copy of
    ``base_model``'s weights (``apply_wmss(peft_model, "adapter:weak")``). Every stage's model is
    then an adapter folder of the base (``AutoModelForCausalLM.from_pretrained`` loads it onto the
    base when peft is installed). The SFT warm-up trains a new adapter; in each round the strong
    adapter is trained further and the weak model is the previous one as a second adapter: in
    round 1 the base itself, as a zero-initialised adapter (exactly M0; ``"base"``, no adapter,
    with ``train_weak=False``). ``lora_alpha`` defaults to twice the rank; ``lora_target_modules``
    is PEFT's ``target_modules`` ("all-linear": every linear layer but the lm head).
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
    fsdp_config: Optional[str | dict] = None
    deepspeed_config: Optional[str | dict] = None
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_target_modules: str | list = "all-linear"
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
        for name in ("fsdp_config", "deepspeed_config"):
            setattr(self, name, _check_parallelism_config(name, getattr(self, name)))
        if self.fsdp_config is not None and self.deepspeed_config is not None:
            raise ValueError("give fsdp_config or deepspeed_config, not both")
        if self.deepspeed_config is not None and self.use_cpu:
            raise ValueError("deepspeed_config with use_cpu: accelerate does not set DeepSpeed "
                             "up for a run told to use the CPU; drop use_cpu (--cpu)")
        if self.fsdp_config is not None and not fsdp_runs_here(self.use_cpu):
            raise ValueError("fsdp_config: accelerate runs FSDP on GPUs only (on CPUs it would "
                             "silently train with DDP instead); run on GPUs, or drop fsdp_config")
        if self.fsdp_config is not None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise ValueError("fsdp_config needs a launched run of several processes (torchrun "
                             "or accelerate launch); on one process accelerate trains without "
                             "FSDP")
        self._check_lora()
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

    def _check_lora(self) -> None:
        if self.lora_rank is None:
            for name, default in (("lora_alpha", None), ("lora_dropout", 0.0),
                                  ("lora_target_modules", "all-linear")):
                if getattr(self, name) != default:
                    raise ValueError(f"{name} is set but lora_rank is not (no LoRA run)")
            return
        check_int("lora_rank", self.lora_rank, 1)
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        self.lora_alpha = _check_real("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        self.lora_dropout = _check_real("lora_dropout", self.lora_dropout, low=0.0, high=1.0,
                                        high_open=True)
        targets = self.lora_target_modules
        if isinstance(targets, tuple):
            targets = self.lora_target_modules = list(targets)
        if not (isinstance(targets, str) and targets) and not (
                isinstance(targets, list) and targets
                and all(isinstance(t, str) and t for t in targets)):
            raise TypeError(f"lora_target_modules must be a module name pattern or a non-empty "
                            f"list of names, got {targets!r}")
        if self.base_model is None:
            raise ValueError("lora_rank: a LoRA run starts from base_model (every model of the "
                             "run is an adapter of it); give base_model instead of "
                             "weak_model/strong_model")
        for name in ("fsdp_config", "deepspeed_config"):
            if getattr(self, name) is not None:
                raise ValueError(f"lora_rank with {name}: LoRA runs train on one process or "
                                 f"with DDP (the adapters are small); drop {name}")
        if self.activation_checkpointing and self.train_weak:
            raise ValueError("lora_rank with activation_checkpointing needs train_weak=False: a "
                             "recomputed layer would use the wrong adapter of the two trained "
                             "ones (see wmss.hf.lora)")
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise ValueError("lora_rank: LoRA runs need peft (pip install peft)")

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
        """The settings that define the run (a rerun must match them to continue); a
        parallelism configuration given as a file counts by its content, not its path alone."""
        settings = dataclasses.asdict(self)
        for volatile in VOLATILE_SETTINGS:
            settings.pop(volatile)
        for name in ("fsdp_config", "deepspeed_config"):
            if isinstance(settings[name], str):
                with open(settings[name], encoding="utf-8") as handle:
                    settings[name] = {"file": settings[name], "content": json.load(handle)}
        return settings


# Each PipelineConfig setting's default, as run.json stores it (JSON: tuples become lists).
_SETTING_DEFAULTS = json.loads(json.dumps({
    f.name: f.default for f in dataclasses.fields(PipelineConfig)
    if f.default is not dataclasses.MISSING}))
_ABSENT = object()


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


@contextlib.contextmanager
def _loading_whole_models():
    """``from_pretrained`` loads whole models although a ZeRO-3 ``TrainingArguments`` is alive
    (transformers would partition them under ``zero.Init``): selection runs each model on every
    process, on a share of the data each, which partitioned models could not do (their forward
    is collective). The reference transformers keeps to that ``TrainingArguments``' DeepSpeed
    configuration is put back afterwards."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # no DeepSpeed integration: nothing to switch off
        yield
        return
    reference = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = reference


def _free(trainer) -> None:
    """Drop ``trainer``'s model, optimizer and accelerator state now, not whenever the garbage
    collector finds their reference cycles (so the memory a stage trained in is free for the
    next step of the run)."""
    import gc

    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _share_file(output: str, process: int, count: int) -> str:
    """The scores file of process ``process`` of ``count``'s share, beside ``output``."""
    return f"{output}{SHARE_INFIX}{process}-of-{count}"


def _parallelism_arguments(config: PipelineConfig) -> dict:
    """The ``TrainingArguments`` fields of ``fsdp_config``/``deepspeed_config`` (none for DDP)."""
    if config.deepspeed_config is not None:
        return {"deepspeed": config.deepspeed_config}
    if config.fsdp_config is None:
        return {}

    fsdp_config = config.fsdp_config
    if isinstance(fsdp_config, str):
        with open(fsdp_config, encoding="utf-8") as handle:
            fsdp_config = json.load(handle)
    return {"fsdp": True, "fsdp_config": fsdp_config}  # training_arguments: True for any version


class _Processes:
    """The processes of a launched run (``torchrun``, ``accelerate launch``; one otherwise), from
    accelerate's ``PartialState`` (made after ``TrainingArguments``, which sets it up as Trainer
    and DeepSpeed need it). The main process writes the run's files: ``on_main`` runs a step there
    and hands its result, or its error, to every process; ``everywhere`` runs a step on every
    process and hands all the results, or any process's error, to every process. So no process
    is left waiting at a collective for one that has failed."""

    def __init__(self):
        from accelerate import PartialState

        state = PartialState()
        self.count, self.index = state.num_processes, state.process_index
        self.is_main, self.device = state.is_main_process, state.device

    def barrier(self) -> None:
        if self.count > 1:
            torch.distributed.barrier()

    def on_main(self, work: Callable[[], object]):
        """``work()`` on the main process; every process returns its result or raises its error
        (``wmss.hf.distributed.portable_error``)."""
        from ..hf.distributed import portable_error

        if self.count == 1:
            return work()
        if not self.is_main:
            outcome = [None, None]
            torch.distributed.broadcast_object_list(outcome, src=0)
            if outcome[1] is not None:
                raise outcome[1]
            return outcome[0]
        try:
            result = work()
        except BaseException as error:  # a KeyboardInterrupt too: the others must not wait
            torch.distributed.broadcast_object_list([None, portable_error(error)], src=0)
            raise
        torch.distributed.broadcast_object_list([result, None], src=0)
        return result

    def everywhere(self, work: Callable[[], object]) -> list:
        """``work()`` on every process: the results of all, in rank order, on every process; if
        any process fails, every process raises (``wmss.hf.distributed.raise_everywhere``)."""
        from ..hf.distributed import raise_everywhere

        if self.count == 1:
            return [work()]
        result, error = None, None
        try:
            result = work()
        except Exception as caught:  # noqa: BLE001 - raised on every process below
            error = caught
        raise_everywhere(error)
        results = [None] * self.count
        torch.distributed.all_gather_object(results, result)
        return results


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
    report under ``"plots"``; without matplotlib one line says they were skipped. On several
    processes only the main one logs (see the module doc).
    """

    def __init__(self, config: PipelineConfig, log: Callable[[str], None] = print,
                 verbose: bool = True, progress_seconds: Optional[float] = None):
        self.config, self._log, self.verbose = config, log, verbose
        self.progress_seconds = (None if progress_seconds is None else
                                 _check_real("progress_seconds", progress_seconds, low=0.0))
        self.root = config.output_dir
        self.tokenizer = None
        self.dataset = None
        self.plots: list[str] = []
        self._plots_skipped = False
        self.processes: Optional[_Processes] = None  # known once run() has set up the processes

    def log(self, line: str) -> None:
        if self.processes is None or self.processes.is_main:
            self._log(line)

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
            old = existing.get("config") or {}
            # A setting newer than the run's wmss is absent from its run.json: its default.
            changed = sorted(k for k in wanted["config"]
                             if old.get(k, _SETTING_DEFAULTS.get(k, _ABSENT)) != wanted["config"][k])
            if changed or not isinstance(existing.get("config"), dict):
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
        if existing is None and self.processes.is_main:
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
               "disable_tqdm": True, **_parallelism_arguments(c), **c.extra_training_args})

    def _parallelism(self, trainer) -> dict:
        """How a training stage ran, for its report: accelerate's distributed type ("NO",
        "MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED", ...) and the process count."""
        kind = trainer.accelerator.distributed_type
        return {"type": getattr(kind, "value", str(kind)), "processes": self.processes.count}

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

        def prepare():
            count, record = self.processes.count, os.path.join(checkpoints, PROCESSES_FILE)
            recorded = _read_json(record)
            if resume and recorded is not None and recorded.get("processes") != count:
                raise ValueError(
                    f"{checkpoints} holds the checkpoints of a run on {recorded.get('processes')} "
                    f"processes, not {count}: resume it on as many (the global batch, and under "
                    "FSDP or ZeRO-3 the checkpoints' sharding, depend on the count), or delete "
                    "that folder to train this stage afresh")
            set_aside_incomplete_checkpoints(checkpoints, after_step=step)
            os.makedirs(checkpoints, exist_ok=True)
            atomic_write_json(record, {"processes": count})

        self.processes.on_main(prepare)  # every process resumes from the same checkpoint
        return trainer.train(resume_from_checkpoint=resume)

    def _stage(self, name: str, work: Callable[[str], dict]) -> dict:
        """Run ``work(stage_dir)`` unless the stage already finished; record its report."""
        processes = self.processes
        stage_dir = os.path.join(self.root, name)
        report_path = os.path.join(stage_dir, REPORT_FILE)
        processes.barrier()  # the previous stage's files are written
        done = _read_json(report_path)
        if done is not None:
            # A kill between the report and the removal of the checkpoints left them behind.
            processes.on_main(lambda: shutil.rmtree(os.path.join(stage_dir, CHECKPOINTS_DIR),
                                                    ignore_errors=True))
            self.log(f"[wmss] {name}: done earlier, skipped")
            self._plot(name, stage_dir, done)
            return done
        processes.on_main(lambda: os.makedirs(stage_dir, exist_ok=True))
        self.log(f"[wmss] {name}: running")
        start = time.perf_counter()
        report = {"stage": name, **work(stage_dir)}
        report["seconds"] = round(time.perf_counter() - start, 3)

        def record():
            atomic_write_json(report_path, report, indent=2)
            # Only now: a kill before the report was written resumes from these checkpoints.
            shutil.rmtree(os.path.join(stage_dir, CHECKPOINTS_DIR), ignore_errors=True)

        processes.on_main(record)
        self.log(f"[wmss] {name}: done in {_duration(report['seconds'])}")
        self._plot(name, stage_dir, report)
        return report

    def _plot(self, name: str, stage_dir: str, report: dict) -> None:
        """Draw a finished stage's plots from its report and files (``wmss.recipe.plots``);
        a plot never stops the run: a missing matplotlib or a failed plot is one log line."""
        from . import plots

        if self._plots_skipped or not self.processes.is_main:
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

    def _save_model_atomically(self, model, final_dir: str) -> None:
        """Write ``model`` (whole: gathered from every process under FSDP or ZeRO-3) and the
        tokenizer to a sibling temporary folder, then rename it into place. Called on every
        process; the main one writes."""
        from ..hf.distributed import save_pretrained_full

        from ..hf.lora import is_peft_model, save_strong

        processes, partial = self.processes, final_dir + ".partial"
        processes.on_main(lambda: shutil.rmtree(partial, ignore_errors=True))
        if is_peft_model(model):  # its active adapter; LoRA runs are never sharded
            processes.on_main(lambda: save_strong(model, partial, merged=False))
        else:
            save_pretrained_full(model, partial)

        def publish():
            self.tokenizer.save_pretrained(partial)
            if os.path.exists(final_dir):  # an earlier attempt died between rename and report
                shutil.rmtree(final_dir)
            os.replace(partial, final_dir)

        processes.on_main(publish)

    def _logit_stats(self, saved: str) -> dict:
        """The means of ``wmss.logit_stats`` of a model this run produced (the SFT model, each
        round's strong model), over the whole data set's supervised tokens, for its stage report
        (``wmss.recipe.inspect.inspect_models``; no ``[tokens, vocab]`` logits). Computed on the
        copy saved in ``saved``, loaded whole (the training's own may be sharded, and is freed by
        then); on several processes each computes its share of the data set (examples
        ``rank::world``) and the token-weighted means are merged."""
        from .inspect import inspect_models

        c, processes = self.config, self.processes
        share = [self.dataset[i] for i in range(processes.index, len(self.dataset),
                                                processes.count)]

        def compute():
            if not any(supervised_tokens(example) for example in share):
                return 0, None
            with _loading_whole_models():
                model = load_causal_lm(saved, c.dtype).to(processes.device)
            result = inspect_models(model, share, batch_size=c.selection_batch_size,
                                    pad_token_id=pad_token_id(self.tokenizer), backend=c.backend)
            return result["supervised_tokens"], result["means"]["strong"]

        parts = [(tokens, means) for tokens, means in processes.everywhere(compute) if tokens]
        total = sum(tokens for tokens, _ in parts)
        return {"supervised_tokens": total,
                **{name: sum(tokens * means[name] for tokens, means in parts) / total
                   for name in parts[0][1]}}

    # ---- stages ------------------------------------------------------------------------------

    def _sft(self, stage_dir: str, base: str) -> dict:
        from transformers import Trainer

        checkpoints = os.path.join(stage_dir, CHECKPOINTS_DIR)
        # The arguments first: under ZeRO-3 from_pretrained then loads the model partitioned.
        args = self._training_args(checkpoints, self.config.sft_epochs)
        model = load_causal_lm(base, self.config.dtype)
        if self.config.lora_rank is not None:
            from peft import get_peft_model

            model = get_peft_model(model, self._lora_config())
        trainer = Trainer(model=model, args=args, train_dataset=self.dataset,
                          processing_class=self.tokenizer,
                          data_collator=Collator(pad_token_id(self.tokenizer)))
        del model  # the trainer's reference goes with it (_finish)
        return {"base": base, **self._finish(trainer, self._train(trainer, checkpoints),
                                              os.path.join(stage_dir, "model"))}

    def _select(self, stage_dir: str, weak: str, strong: str) -> dict:
        """WD-DS, the same flow and files as ``wmss select`` (scores, active set, summary)."""
        from . import selection

        c = self.config
        device = self.processes.device  # this process's own device (cuda:LOCAL_RANK, or cpu)
        with _loading_whole_models():
            models = [load_causal_lm(source, c.dtype).to(device) for source in (strong, weak)]
        scores = self._score(*models, os.path.join(stage_dir, selection.SCORES_FILE))
        del models
        chosen = selection.select_active(scores, c.selection_options())  # the same everywhere
        self.processes.on_main(lambda: selection.save_selection(chosen, stage_dir, extra_summary={
            "data": c.data, "models": {"strong": strong, "weak": weak}}))
        self.log(f"[wmss] selected {len(chosen.active)} of {len(self.dataset)} examples")
        return {"weak": weak, "strong": strong, "active": len(chosen.active),
                "summary": chosen.summary}

    def _score(self, strong_model, weak_model, output: str):
        """``score_dataset`` of the whole data set into ``output``. On several processes each
        scores its share (examples ``rank::world``, resumable in a file of its own beside
        ``output``) and the main process writes the merged scores."""
        from . import selection

        c, processes = self.config, self.processes
        options = dict(batch_size=c.selection_batch_size, backend=c.backend, progress=False,
                       pad_token_id=pad_token_id(self.tokenizer))
        if processes.count == 1:
            return selection.score_dataset(strong_model, weak_model, self.dataset, output=output,
                                           **options)
        indices = list(range(processes.index, len(self.dataset), processes.count))

        def score_share():
            if not indices:  # fewer examples than processes leave some without a share
                return None
            try:
                part = selection.score_dataset(
                    strong_model, weak_model, [self.dataset[i] for i in indices],
                    output=_share_file(output, processes.index, processes.count), **options)
            except ValueError as error:  # its example indices are the share's
                raise ValueError(f"{error} (process {processes.index} of {processes.count} "
                                 f"scores the examples {processes.index}::{processes.count}: its "
                                 f"example i is example {processes.index} + {processes.count} i "
                                 "of the data set)") from None
            return (indices, part.entropy_strong, part.entropy_weak, part.tokens,
                    part.metadata["models"])

        parts = [p for p in processes.everywhere(score_share) if p is not None]
        size = len(self.dataset)
        strong, weak = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
        tokens = torch.zeros(size, dtype=torch.int64)
        for where, *values, _ in parts:
            for merged, value in zip((strong, weak, tokens), values):
                merged[where] = value
        scores = selection.DatasetScores(strong, weak, tokens, {
            "dataset_sha256": selection.dataset_fingerprint(self.dataset),
            "models": parts[0][-1]})

        def save():
            scores.save(output)
            folder = os.path.dirname(output)
            for name in os.listdir(folder):  # merged: no share is needed to resume any more
                if name.startswith(os.path.basename(output) + SHARE_INFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, name))

        processes.on_main(save)
        return scores

    def _lora_config(self):
        from peft import LoraConfig

        c = self.config
        return LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                          target_modules=c.lora_target_modules, task_type="CAUSAL_LM")

    def _lora_models(self, weak: str, strong: str) -> tuple:
        """A round's LoRA pair on one copy of the base: the strong adapter (trained further) and
        the weak model as ``apply_wmss`` names it inside the same PEFT model."""
        from peft import PeftModel

        c = self.config
        model = PeftModel.from_pretrained(load_causal_lm(c.base_model, c.dtype), strong,
                                          is_trainable=True)
        if weak != c.base_model:  # a later round: the previous strong adapter
            model.load_adapter(weak, adapter_name=LORA_WEAK_ADAPTER, is_trainable=c.train_weak)
        elif c.train_weak:  # round 1 trains M0 as a zero-initialised adapter (exactly M0)
            model.add_adapter(LORA_WEAK_ADAPTER, self._lora_config())
        else:  # round 1, frozen: M0 is the base itself, with the adapters off
            return model, "base"
        return model, f"adapter:{LORA_WEAK_ADAPTER}"

    def _joint_train(self, stage_dir: str, weak: str, strong: str, active: list[int]) -> dict:
        from ..hf.pair import apply_wmss
        from ..hf.trainer import WMSSTrainer

        c = self.config
        checkpoints = os.path.join(stage_dir, CHECKPOINTS_DIR)
        # The arguments first: under ZeRO-3 from_pretrained then loads the models partitioned.
        args = self._training_args(checkpoints, c.wmss_epochs)
        if c.lora_rank is None:
            strong_model, weak_model = load_causal_lm(strong, c.dtype), load_causal_lm(weak, c.dtype)
        else:
            strong_model, weak_model = self._lora_models(weak, strong)
        pair = apply_wmss(strong_model, weak_model, lam=c.lam, train_weak=c.train_weak,
                          gap_threshold=c.gap_threshold, backend=c.backend)
        trainer = WMSSTrainer(pair, args, train_dataset=[self.dataset[i] for i in active],
                              processing_class=self.tokenizer)
        result = self._train(trainer, checkpoints)
        del pair
        return {"weak": weak, "strong": strong,
                **self._finish(trainer, result, os.path.join(os.path.dirname(stage_dir), "model"))}

    def _finish(self, trainer, result, model_dir: str) -> dict:
        """A training stage's end: the trained model (a pair's strong model) saved in
        ``model_dir``, the training state freed (``trainer`` is the last reference to its model
        and optimizer), then the saved model's logit statistics; the stage report's entries."""
        from ..hf.distributed import strip_wrappers
        from ..hf.pair import WMSSPair

        model = strip_wrappers(trainer.model)  # a PEFT model stays one (its adapter is saved)
        self._save_model_atomically(model.strong if isinstance(model, WMSSPair) else model,
                                    model_dir)
        report = {"model": model_dir, "train_loss": result.training_loss,
                  "steps": result.global_step, PARALLELISM_KEY: self._parallelism(trainer),
                  "log": trainer.state.log_history}
        del model
        _free(trainer)
        return {**report, LOGIT_STATS_KEY: self._logit_stats(model_dir)}

    def run(self) -> dict:
        """Every stage not finished yet, holding the output directory's lock throughout (the main
        process holds it for all the processes of a launched run)."""
        try:  # a dry run: values TrainingArguments refuses fail now, not after the SFT; it also
            # sets up the processes (and DeepSpeed's) as Trainer will use them
            self._training_args(os.path.join(self.root, CHECKPOINTS_DIR), self.config.sft_epochs)
        except (TypeError, ValueError) as error:
            c = self.config
            settings = ["extra_training_args"] + [
                name for name in ("fsdp_config", "deepspeed_config") if getattr(c, name)]
            raise ValueError(f"{', '.join(settings)}: TrainingArguments refuses them: "
                             f"{error}") from None
        self.processes = _Processes()
        with contextlib.ExitStack() as held:
            self.processes.on_main(
                lambda: held.enter_context(directory_lock(self.root, "wmss train")))
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
        self.processes.on_main(
            lambda: atomic_write_json(os.path.join(self.root, REPORT_FILE), report, indent=2))
        if self.plots:
            self.log("[wmss] plots: " + ", ".join(os.path.relpath(p, self.root)
                                                  for p in self.plots))
        self.log(f"[wmss] done: final strong model in {strong}")
        return report
