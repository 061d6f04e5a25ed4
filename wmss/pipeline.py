"""The WMSS recipe end to end (the paper's Algorithm 1), resumable, one directory per stage.

    base M0 --SFT--> M1                                  sft/
    round t = 1..K:  weak = M_{t-1}, strong = M_t
        WD-DS: score the data with both, draw the active set   round-t/selection/
        WD-JT: train the pair on the active set -> M_{t+1}     round-t/train/ (checkpoints)
                                                               round-t/model/ (the new strong)

Each stage writes ``report.json`` (settings, results, timings) when it finishes; a rerun of the
same configuration skips finished stages and resumes an interrupted training stage from its last
Trainer checkpoint. ``run.json`` at the top holds the configuration; rerunning with a different
one is refused rather than mixing two runs in one directory. Every file is written atomically,
and a stage's final model directory appears only once complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import defaults
from .data import Collator, encode_records, load_jsonl, pad_token_id
from .hf import load_causal_lm
from .io import atomic_write_json

RUN_FILE, REPORT_FILE = "run.json", "report.json"


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
    num_draws: Optional[int] = None
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
        if self.base_model is None and (self.weak_model is None or self.strong_model is None):
            raise ValueError("give base_model (SFT warm-up first) or both weak_model and "
                             "strong_model")
        if self.base_model is not None and (self.weak_model or self.strong_model):
            raise ValueError("give base_model or a weak_model/strong_model pair, not both")
        if self.rounds < 0 or (self.rounds == 0 and self.base_model is None):
            raise ValueError(f"rounds must be >= 1 (or 0 with base_model: SFT only), got "
                             f"{self.rounds}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def fingerprint(self) -> dict:
        """The settings that define the run (a rerun must match them to continue)."""
        settings = dataclasses.asdict(self)
        for volatile in ("output_dir", "logging_steps", "selection_batch_size", "backend",
                         "use_cpu"):
            settings.pop(volatile)
        return settings


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _save_model_atomically(model, tokenizer, final_dir: str) -> None:
    """Write a model (and tokenizer) to a sibling temp dir, then rename it into place."""
    partial = final_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if os.path.exists(final_dir):  # an earlier attempt died between rename and report
        shutil.rmtree(final_dir)
    os.replace(partial, final_dir)


class Pipeline:
    """Runs ``PipelineConfig``; ``run()`` returns the final report (also in ``report.json``).

    ``log`` receives one line per stage event; ``verbose=False`` also silences the Trainer's
    per-step log lines and transformers' progress bars.
    """

    def __init__(self, config: PipelineConfig, log: Callable[[str], None] = print,
                 verbose: bool = True):
        self.config, self.log, self.verbose = config, log, verbose
        self.root = config.output_dir
        self.tokenizer = None
        self.dataset = None

    # ---- setup -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not self.verbose:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()

        os.makedirs(self.root, exist_ok=True)
        wanted = self.config.fingerprint()
        existing = _read_json(os.path.join(self.root, RUN_FILE))
        if existing is not None and existing["config"] != wanted:
            changed = sorted(k for k in wanted if existing["config"].get(k) != wanted[k])
            raise ValueError(f"{self.root} holds a run with other settings ({', '.join(changed)}); "
                             "use a new output directory to start another run")
        if existing is None:
            atomic_write_json(os.path.join(self.root, RUN_FILE), {"config": wanted}, indent=2)
        source = (self.config.tokenizer or self.config.base_model or self.config.strong_model)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        records = load_jsonl(self.config.data)
        self.dataset = encode_records(records, self.tokenizer, self.config.max_length)
        self.log(f"[wmss] {len(self.dataset)} examples from {self.config.data}")

    def _training_args(self, output_dir: str, epochs: float):
        from .trainer import training_arguments

        c = self.config
        return training_arguments(
            output_dir, num_train_epochs=epochs, learning_rate=c.learning_rate,
            warmup_ratio=c.warmup_ratio, max_grad_norm=c.max_grad_norm,
            per_device_train_batch_size=c.batch_size,
            gradient_accumulation_steps=c.gradient_accumulation_steps, bf16=c.bf16,
            activation_checkpointing=c.activation_checkpointing, seed=c.seed,
            save_strategy="steps", save_steps=c.save_steps, save_total_limit=2,
            logging_steps=c.logging_steps, use_cpu=c.use_cpu, weight_decay=0.0,
            disable_tqdm=True, **c.extra_training_args)

    def _train(self, trainer, checkpoints: str):
        """``trainer.train()``, resuming from the stage's last checkpoint if there is one."""
        from transformers import PrinterCallback

        if not self.verbose:
            trainer.remove_callback(PrinterCallback)
        return trainer.train(resume_from_checkpoint=self._resume_point(checkpoints))

    def _stage(self, name: str, work: Callable[[str], dict]) -> dict:
        """Run ``work(stage_dir)`` unless the stage already finished; record its report."""
        stage_dir = os.path.join(self.root, name)
        report_path = os.path.join(stage_dir, REPORT_FILE)
        done = _read_json(report_path)
        if done is not None:
            self.log(f"[wmss] {name}: done earlier, skipped")
            return done
        os.makedirs(stage_dir, exist_ok=True)
        self.log(f"[wmss] {name}: running")
        start = time.perf_counter()
        report = {"stage": name, **work(stage_dir)}
        report["seconds"] = round(time.perf_counter() - start, 3)
        atomic_write_json(report_path, report, indent=2)
        return report

    @staticmethod
    def _resume_point(checkpoints: str) -> Optional[str]:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(checkpoints) if os.path.isdir(checkpoints) else None

    # ---- stages ------------------------------------------------------------------------------

    def _sft(self, stage_dir: str, base: str) -> dict:
        from transformers import Trainer

        model = load_causal_lm(base, self.config.dtype)
        checkpoints = os.path.join(stage_dir, "checkpoints")
        trainer = Trainer(model=model, args=self._training_args(checkpoints, self.config.sft_epochs),
                          train_dataset=self.dataset, processing_class=self.tokenizer,
                          data_collator=Collator(pad_token_id(self.tokenizer)))
        result = self._train(trainer, checkpoints)
        _save_model_atomically(model, self.tokenizer, os.path.join(stage_dir, "model"))
        shutil.rmtree(checkpoints, ignore_errors=True)
        return {"model": os.path.join(stage_dir, "model"), "base": base,
                "train_loss": result.training_loss, "steps": result.global_step,
                "log": trainer.state.log_history}

    def _select(self, stage_dir: str, weak: str, strong: str) -> dict:
        from . import selection

        c = self.config
        strong_model, weak_model = load_causal_lm(strong, c.dtype), load_causal_lm(weak, c.dtype)
        if torch.cuda.is_available() and not c.use_cpu:
            strong_model, weak_model = strong_model.cuda(), weak_model.cuda()
        scores = selection.score_dataset(
            strong_model, weak_model, self.dataset, batch_size=c.selection_batch_size,
            pad_token_id=pad_token_id(self.tokenizer), output=os.path.join(stage_dir, "scores.json"),
            backend=c.backend, progress=False)
        del strong_model, weak_model
        weights = selection.sampling_weights(scores.entropy_strong, scores.entropy_weak,
                                             alpha=c.alpha, beta=c.beta, gamma=c.gamma,
                                             normalize=c.normalize)
        active = selection.draw_active(weights, c.num_draws, seed=c.seed)
        atomic_write_json(os.path.join(stage_dir, "active_indices.json"), active.tolist())
        summary = selection.summarize(scores, weights, active, alpha=c.alpha, beta=c.beta,
                                      gamma=c.gamma, normalize=c.normalize,
                                      num_draws=c.num_draws, seed=c.seed)
        self.log(f"[wmss] selected {len(active)} of {len(self.dataset)} examples")
        return {"weak": weak, "strong": strong, "active": len(active), "summary": summary}

    def _joint_train(self, stage_dir: str, weak: str, strong: str, active: list[int]) -> dict:
        from .pair import apply_wmss
        from .trainer import WMSSTrainer

        c = self.config
        pair = apply_wmss(load_causal_lm(strong, c.dtype), load_causal_lm(weak, c.dtype),
                          lam=c.lam, train_weak=c.train_weak, gap_threshold=c.gap_threshold,
                          backend=c.backend)
        checkpoints = os.path.join(stage_dir, "checkpoints")
        trainer = WMSSTrainer(pair, self._training_args(checkpoints, c.wmss_epochs),
                              train_dataset=[self.dataset[i] for i in active],
                              processing_class=self.tokenizer)
        result = self._train(trainer, checkpoints)
        model_dir = os.path.join(os.path.dirname(stage_dir), "model")
        _save_model_atomically(pair, self.tokenizer, model_dir)
        shutil.rmtree(checkpoints, ignore_errors=True)
        return {"weak": weak, "strong": strong, "model": model_dir,
                "train_loss": result.training_loss, "steps": result.global_step,
                "log": trainer.state.log_history}

    def run(self) -> dict:
        self._prepare()
        c = self.config
        stages = []
        if c.base_model is not None:
            sft = self._stage("sft", lambda d: self._sft(d, c.base_model))
            stages.append(sft)
            weak, strong = c.base_model, sft["model"]
        else:
            weak, strong = c.weak_model, c.strong_model
        for t in range(1, c.rounds + 1):
            selection = self._stage(f"round-{t}/selection",
                                    lambda d: self._select(d, weak, strong))
            active = _read_json(os.path.join(self.root, f"round-{t}", "selection",
                                             "active_indices.json"))
            trained = self._stage(f"round-{t}/train",
                                  lambda d: self._joint_train(d, weak, strong, active))
            stages += [selection, trained]
            weak, strong = strong, trained["model"]
        report = {"config": c.fingerprint(), "final_model": strong,
                  "stages": [{k: v for k, v in s.items() if k != "log"} for s in stages]}
        atomic_write_json(os.path.join(self.root, REPORT_FILE), report, indent=2)
        self.log(f"[wmss] done: final strong model in {strong}")
        return report
