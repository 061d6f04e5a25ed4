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
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..hf.models import load_causal_lm
from ..io import atomic_write_json, atomic_write_text
from .pipeline import Pipeline, PipelineConfig
from .toy import char_tokenizer, tiny_causal_lm


SETTINGS_FILE = "demo.json"


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults run in about a minute on two CPU cores."""

    train_size: int = 9000
    pretrain_size: int = 4000
    eval_size: int = 400
    digits: int = 2
    hidden_size: int = 128
    num_layers: int = 2
    batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0


@dataclass
class DemoResult:
    sft_accuracy: float
    wmss_accuracy: float
    eval_size: int
    active_size: int
    train_size: int
    seconds: float

    def summary_line(self) -> str:
        diff = 100 * (self.wmss_accuracy - self.sft_accuracy)
        return (f"WMSS (1 SFT epoch + 1 WMSS epoch on {self.active_size}/{self.train_size} "
                f"selected examples): {100 * self.wmss_accuracy:.1f}% exact match | SFT (2 epochs): "
                f"{100 * self.sft_accuracy:.1f}% | difference {diff:+.1f} points on "
                f"{self.eval_size} held-out problems")


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


def run_demo(output_dir: str, settings: DemoSettings = DemoSettings(),
             log: Callable[[str], None] = print) -> DemoResult:
    """Build the task and the base model in ``output_dir``, train both arms, evaluate both."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the demo prints its own progress lines
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    s = settings
    rng = random.Random(s.seed)
    os.makedirs(output_dir, exist_ok=True)
    # A kept --output-dir holds one demo: another one's settings would rewrite its data files
    # under its finished stages, so it is refused before anything is written.
    settings_path = os.path.join(output_dir, SETTINGS_FILE)
    wanted = dataclasses.asdict(s)
    if os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as handle:
            held = json.load(handle)
        if held != wanted:
            changed = sorted(k for k in wanted if held.get(k) != wanted[k])
            raise ValueError(f"{output_dir} holds a demo with other settings "
                             f"({', '.join(changed)}); use another --output-dir")
    else:
        atomic_write_json(settings_path, wanted, indent=2)
    tokenizer = char_tokenizer()
    init = os.path.join(output_dir, "init")
    tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=s.hidden_size,
                   num_layers=s.num_layers, seed=s.seed).save_pretrained(init)
    tokenizer.save_pretrained(init)

    train = addition_problems(s.train_size, s.digits, rng)
    held_out = addition_problems(s.eval_size, s.digits, rng, exclude=frozenset(train))
    pretrain = addition_problems(s.pretrain_size, s.digits, rng, exclude=frozenset(held_out))
    data, pretrain_data = (os.path.join(output_dir, name) for name in ("train.jsonl",
                                                                      "pretrain.jsonl"))
    atomic_write_text(data, "".join(json.dumps(_record(a, b, s.digits)) + "\n" for a, b in train))
    atomic_write_text(pretrain_data, "".join(json.dumps({"text": f"{a}+{b}={a + b}"}) + "\n"
                                             for a, b in pretrain))
    log(f"[demo] {s.train_size} training and {s.eval_size} held-out {s.digits}-digit additions; "
        f"tiny Llama d={s.hidden_size}, {s.num_layers} layers, in {output_dir}")

    settings = dict(learning_rate=s.learning_rate, batch_size=s.batch_size,
                    gradient_accumulation_steps=1, max_length=64, seed=s.seed,
                    use_cpu=not torch.cuda.is_available(), logging_steps=100)
    quiet = dict(log=lambda message: None, verbose=False)  # the demo prints its own lines
    base = init
    if s.pretrain_size:
        log(f"[demo] base model M0: 1 epoch on {s.pretrain_size} lines of plain arithmetic text")
        base = Pipeline(PipelineConfig(output_dir=os.path.join(output_dir, "pretrain"), rounds=0,
                                       data=pretrain_data, base_model=init, **settings),
                        **quiet).run()["final_model"]
    common = dict(data=data, base_model=base, **settings)
    log("[demo] SFT arm: 2 epochs")
    sft = Pipeline(PipelineConfig(output_dir=os.path.join(output_dir, "sft-2-epochs"),
                                  rounds=0, sft_epochs=2, **common), **quiet).run()
    log("[demo] WMSS arm: 1 SFT epoch, then WD-DS selection and 1 WMSS epoch")
    wmss = Pipeline(PipelineConfig(output_dir=os.path.join(output_dir, "sft-1-wmss-1"),
                                   rounds=1, sft_epochs=1, wmss_epochs=1, **common),
                    **quiet).run()

    accuracy = {name: exact_match(load_causal_lm(report["final_model"]), tokenizer, held_out,
                                  s.digits)
                for name, report in (("sft", sft), ("wmss", wmss))}
    selection = next(st for st in wmss["stages"] if st["stage"].endswith("selection"))
    return DemoResult(sft_accuracy=accuracy["sft"], wmss_accuracy=accuracy["wmss"],
                      eval_size=s.eval_size, active_size=selection["active"],
                      train_size=s.train_size, seconds=time.perf_counter() - start)
