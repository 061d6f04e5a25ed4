"""wmss.recipe.plots: what each plot draws equals the files a run writes; PNGs written atomically.

And the pipeline's progress lines (``TrainingProgress``), checked with a fake clock.
"""

import math
import os

import pytest
import torch

from wmss.recipe import plots
from wmss.recipe.pipeline import TrainingProgress
from wmss.recipe.selection import (DatasetScores, SelectionOptions, save_selection,
                                   select_active)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Trainer's log_history of a joint-training stage: two step entries, an evaluation entry (no
# training loss) and the final summary entry (train_loss, not a step's loss).
JOINT_LOG = [
    {"loss": 2.5, "strong_loss": 2.75, "weak_loss": 3.0, "entropy_strong": 1.25,
     "entropy_weak": 1.5, "mixed_fraction": 0.5, "learning_rate": 1e-3, "epoch": 0.5, "step": 1},
    {"eval_loss": 9.0, "epoch": 0.5, "step": 1},
    {"loss": 2.0, "strong_loss": 2.25, "weak_loss": 2.5, "entropy_strong": 1.0,
     "entropy_weak": 1.375, "mixed_fraction": 0.25, "learning_rate": 5e-4, "epoch": 1.0,
     "step": 2},
    {"train_runtime": 1.0, "train_loss": 2.25, "epoch": 1.0, "step": 2},
]


def is_png(path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(len(PNG_SIGNATURE))
    return head == PNG_SIGNATURE and os.path.getsize(path) > 1000


def test_the_loss_and_entropy_curves_are_the_logged_step_values():
    report = {"stage": "round-1/train", "log": JOINT_LOG}
    assert plots.loss_data(report) == {"step": [1, 2], "loss": [2.5, 2.0],
                                       "strong_loss": [2.75, 2.25], "weak_loss": [3.0, 2.5]}
    assert plots.entropy_data(report) == {"step": [1, 2], "entropy_strong": [1.25, 1.0],
                                          "entropy_weak": [1.5, 1.375],
                                          "mixed_fraction": [0.5, 0.25]}
    sft = {"stage": "sft", "log": [{"loss": 4.0, "step": 10}, {"loss": 3.0, "step": 20},
                                   {"train_loss": 3.5, "step": 20}]}
    assert plots.loss_data(sft) == {"step": [10, 20], "loss": [4.0, 3.0]}
    assert plots.entropy_data(sft) == {"step": [10, 20]}  # plain SFT logs no entropies
    with pytest.raises(ValueError, match="'sft': its report has no training log"):
        plots.loss_data({"stage": "sft"})


@pytest.fixture
def selection_dir(tmp_path):
    """A selection directory as wmss select writes it; example 2 has no supervised token."""
    scores = DatasetScores([0.5, 2.0, 0.0, 1.0, 3.0, 0.25], [1.5, 1.0, 0.0, 1.0, 0.5, 2.0],
                           [4, 3, 0, 5, 2, 6], {"dataset_sha256": "x"})
    scores.save(tmp_path / "scores.json")
    options = SelectionOptions(alpha=0.3, beta=0.5, gamma=0.2, normalize="per_term", seed=1)
    chosen = select_active(scores, options)
    save_selection(chosen, tmp_path)
    return tmp_path, scores, options, chosen


def test_the_selection_plot_draws_the_selection_files(selection_dir):
    directory, scores, options, chosen = selection_dir
    data = plots.selection_data(str(directory))
    kept = [0, 1, 3, 4, 5]  # example 2 is never drawn and has no entropy to show
    dh = [0.5 - 1.5, 2.0 - 1.0, 1.0 - 1.0, 3.0 - 0.5, 0.25 - 2.0]
    assert data["discrepancy"] == dh
    active = sorted(set(chosen.active.tolist()))
    assert data["selected_discrepancy"] == [dh[kept.index(i)] for i in active]
    # The summary's options (per_term, 0.3/0.5/0.2), each term divided by its sum first.
    negative = [max(-d, 0.0) for d in dh]
    positive = [max(d, 0.0) for d in dh]
    strong = [0.5, 2.0, 1.0, 3.0, 0.25]
    for name, values, coefficient in (("alpha", negative, 0.3), ("beta", strong, 0.5),
                                      ("gamma", positive, 0.2)):
        total = sum(values)
        assert data["terms"][name] == pytest.approx([coefficient * v / total for v in values])
    assert data["term_share"] == chosen.summary["term_share"]
    assert data["term_share"] == pytest.approx({"alpha": 0.3, "beta": 0.5, "gamma": 0.2})


def test_plot_stage_writes_png_files_and_names_them(selection_dir, tmp_path):
    directory, *_ = selection_dir
    assert plots.plot_stage(str(directory), {"stage": "round-1/selection", "active": 4}) == [
        plots.SELECTION_PLOT]
    train = tmp_path / "train"
    train.mkdir()
    assert plots.plot_stage(str(train), {"stage": "round-1/train", "log": JOINT_LOG}) == [
        plots.LOSS_PLOT, plots.ENTROPY_PLOT]
    sft = tmp_path / "sft"
    sft.mkdir()
    assert plots.plot_stage(str(sft), {"stage": "sft", "log": [{"loss": 1.0, "step": 1}]}) == [
        plots.LOSS_PLOT]  # plain SFT logs no entropies: no entropy plot
    for path in (directory / plots.SELECTION_PLOT, train / plots.LOSS_PLOT,
                 train / plots.ENTROPY_PLOT, sft / plots.LOSS_PLOT):
        assert is_png(path), path
    # Written through a temporary file and a rename: nothing else is left in the folders.
    assert sorted(os.listdir(train)) == [plots.ENTROPY_PLOT, plots.LOSS_PLOT]
    # A stage that logged no step (shorter than logging_steps) has no curve to draw.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plots.plot_stage(str(empty), {"stage": "sft", "log": JOINT_LOG[3:]}) == []
    assert os.listdir(empty) == []


def test_the_demo_comparison_draws_each_seed_of_both_arms(tmp_path):
    runs = [{"seed": 3, "sft_accuracy": 0.5, "wmss_accuracy": 0.25, "sft_loss": 1.5,
             "wmss_loss": 2.0},
            {"seed": 4, "sft_accuracy": 0.75, "wmss_accuracy": 1.0, "sft_loss": 1.0,
             "wmss_loss": 0.5}]
    summary = {"runs": runs, "mean": {"sft": {"accuracy": 0.625, "loss": 1.25},
                                      "wmss": {"accuracy": 0.625, "loss": 1.25}},
               "std": {"sft": {"accuracy": 0.1, "loss": 0.2}, "wmss": {"accuracy": 0.3,
                                                                     "loss": 0.4}}}
    data = plots.demo_comparison_data(summary)
    assert data["seeds"] == [3, 4]
    assert data["accuracy"] == {"sft": [50.0, 75.0], "wmss": [25.0, 100.0]}
    assert data["loss"] == {"sft": [1.5, 1.0], "wmss": [2.0, 0.5]}
    path = tmp_path / "comparison.png"
    plots.plot_demo_comparison(str(path), summary)
    assert is_png(path)


def test_plotting_unavailable_says_why_without_matplotlib(monkeypatch):
    import builtins

    assert plots.plotting_unavailable() is None
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plots.plotting_unavailable().startswith("matplotlib is not installed")


# ---- progress lines --------------------------------------------------------------------------

class _State:
    def __init__(self, max_steps, global_step=0):
        self.max_steps, self.global_step = max_steps, global_step


def _drive(progress, state, steps, seconds_per_step, clock):
    for _ in range(steps):
        clock["now"] += seconds_per_step
        state.global_step += 1
        progress.on_step_end(None, state, None)


def test_progress_lines_give_stage_step_rate_and_time_left_at_most_every_interval():
    clock, lines = {"now": 100.0}, []
    progress = TrainingProgress("round-1/train", lines.append, every_seconds=10.0,
                                clock=lambda: clock["now"])
    state = _State(max_steps=400)
    progress.on_train_begin(None, state, None)
    _drive(progress, state, 400, 0.25, clock)  # 4 steps/s: 100 s in all
    assert lines[0] == "[wmss] round-1/train: training, 400 optimizer steps"
    assert lines[1] == "[wmss] round-1/train: step 1/400 (4.0 steps/s, 1 min 40 s left)"
    # Then one line per 10 s (every 40th step) and the last step.
    assert lines[2] == "[wmss] round-1/train: step 41/400 (4.0 steps/s, 1 min 30 s left)"
    assert lines[-1] == "[wmss] round-1/train: step 400/400 (4.0 steps/s, 0 s left)"
    assert len(lines) == 2 + 9 + 1  # begin, step 1, steps 41..361, step 400


def test_a_resumed_stage_counts_its_rate_from_the_steps_it_ran():
    clock, lines = {"now": 0.0}, []
    progress = TrainingProgress("sft", lines.append, every_seconds=1e9,
                                clock=lambda: clock["now"])
    state = _State(max_steps=1000, global_step=900)
    progress.on_train_begin(None, state, None)
    _drive(progress, state, 1, 0.5, clock)
    assert lines == ["[wmss] sft: training, 1000 optimizer steps, resuming after step 900",
                     "[wmss] sft: step 901/1000 (2.0 steps/s, 50 s left)"]
    _drive(progress, state, 99, 0.5, clock)
    assert lines[-1] == "[wmss] sft: step 1000/1000 (2.0 steps/s, 0 s left)"
    assert len(lines) == 3


def test_progress_refuses_a_bad_interval():
    with pytest.raises(ValueError, match="every_seconds"):
        TrainingProgress("sft", print, every_seconds=math.nan)
    with pytest.raises(TypeError, match="every_seconds"):
        TrainingProgress("sft", print, every_seconds="10")
