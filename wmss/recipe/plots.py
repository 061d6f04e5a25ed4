"""PNG plots of a ``wmss train`` run, drawn from the files the run writes (matplotlib, Agg).

Per stage directory, beside its ``report.json``:

* ``loss.png`` (``sft``, ``round-t/train``): the training loss over the optimizer steps, from
  the stage report's ``"log"`` (Trainer's ``log_history``); for joint training also the
  strong-only and weak-only losses;
* ``entropy.png`` (``round-t/train``): the strong and weak mean entropies and the mixed fraction
  over the joint-training steps, from the same log;
* ``selection.png`` (``round-t/selection``): the histogram of the entropy discrepancy
  ``dH_i = H_strong_i - H_weak_i`` over every scored example and over the active set, and the
  three WD-DS weight terms of every example against ``dH_i`` (their shares of the weight mass
  in the legend), from ``scores.json``, ``active_indices.json`` and ``selection_summary.json``.

Everything is drawn from those files, never from a live object, so a resumed run re-plots what
an uninterrupted one would, and ``python -m wmss.recipe.plots RUN_DIR`` redraws a finished run.
The ``*_data`` functions return exactly what is drawn (plain lists), without matplotlib.

matplotlib is optional (the ``test`` and ``bench`` extras): ``plotting_unavailable()`` says why
plots cannot be drawn, and the pipeline then skips them with one line; a plot never stops a run.
Files are written atomically (``wmss.io.atomic_write_bytes``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
from typing import Optional

from ..io import atomic_write_bytes

__all__ = ["ENTROPY_PLOT", "LOSS_PLOT", "SELECTION_PLOT", "demo_comparison_data", "entropy_data",
           "loss_data", "plot_demo_comparison", "plot_run", "plot_stage", "plotting_unavailable",
           "selection_data"]

LOSS_PLOT, ENTROPY_PLOT, SELECTION_PLOT = "loss.png", "entropy.png", "selection.png"
# Trainer's name of the per-step training loss in log_history (its final summary entry has
# "train_loss" instead, which is not a step's value).
LOSS_KEY = "loss"
# The joint-training losses and statistics WMSSTrainer logs (wmss.hf.trainer._LOGGED).
PAIR_LOSSES = ("strong_loss", "weak_loss")
PAIR_STATISTICS = ("entropy_strong", "entropy_weak", "mixed_fraction")
HISTOGRAM_BINS = 40
DPI = 100  # as benchmarks/plot.py
STYLE = {  # series -> matplotlib line style
    LOSS_KEY: dict(color="tab:blue", linewidth=2),
    "strong_loss": dict(color="tab:green"),
    "weak_loss": dict(color="tab:red"),
    "entropy_strong": dict(color="tab:green"),
    "entropy_weak": dict(color="tab:red"),
    "mixed_fraction": dict(color="tab:purple"),
    "alpha": dict(color="tab:red"),
    "beta": dict(color="tab:blue"),
    "gamma": dict(color="tab:green"),
    "sft": dict(color="tab:gray"),
    "wmss": dict(color="tab:blue"),
}
TERM_LABELS = {"alpha": "alpha [-dH]+", "beta": "beta H", "gamma": "gamma [dH]+"}


def plotting_unavailable() -> Optional[str]:
    """Why plots cannot be drawn here (matplotlib missing or broken), or None if they can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:  # ModuleNotFoundError included
        return f"matplotlib is not installed ({error}; pip install matplotlib)"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """The figure as a PNG at ``path``, atomically (a reader sees the old file or the new)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot be read for plotting ({error})") from None


# ---- what is drawn ---------------------------------------------------------------------------

def _series(report: dict, names) -> dict:
    """``{"step": [...], name: [...]}`` from the log entries holding the training loss; a name
    appears only if every such entry has it (so each list pairs with ``step``)."""
    log = report.get("log")
    if not isinstance(log, list):
        raise ValueError(f"stage {report.get('stage')!r}: its report has no training log")
    entries = [e for e in log if isinstance(e, dict) and LOSS_KEY in e and "step" in e]
    data = {"step": [int(e["step"]) for e in entries]}
    for name in names:
        if entries and all(name in e for e in entries):
            data[name] = [float(e[name]) for e in entries]
    return data


def loss_data(report: dict) -> dict:
    """The loss curves of a training stage's report (``sft`` or ``round-t/train``).

    Returns ``{"step": [int], "loss": [float], ...}``: one value per logged optimizer step of
    ``report["log"]``, in log order; joint training adds ``strong_loss`` and ``weak_loss``.
    """
    return _series(report, (LOSS_KEY, *PAIR_LOSSES))


def entropy_data(report: dict) -> dict:
    """The joint-training statistics of a ``round-t/train`` report: ``{"step": [int],
    "entropy_strong", "entropy_weak", "mixed_fraction": [float]}`` per logged step (only the
    names the log holds)."""
    return _series(report, PAIR_STATISTICS)


def selection_data(stage_dir: str) -> dict:
    """What ``selection.png`` draws, from a selection directory's three files.

    Returns ``{"discrepancy": [float], "selected_discrepancy": [float], "terms": {"alpha",
    "beta", "gamma": [float]}, "term_share": {...}}``: ``dH_i`` of every example with a
    supervised target (data-set order), ``dH_i`` of the distinct active examples among them,
    the weight terms of those same examples (``weight_terms`` with the summary's options) and
    the summary's ``term_share``.
    """
    from .selection import ACTIVE_FILE, SCORES_FILE, SUMMARY_FILE, DatasetScores, weight_terms

    scores = DatasetScores.load(os.path.join(stage_dir, SCORES_FILE))
    active = _read_json(os.path.join(stage_dir, ACTIVE_FILE))
    summary = _read_json(os.path.join(stage_dir, SUMMARY_FILE))
    options = summary["options"]
    terms = weight_terms(scores.entropy_strong, scores.entropy_weak, **options)
    supervised = (scores.tokens > 0).tolist()
    discrepancy = scores.discrepancy.tolist()
    kept = [i for i, ok in enumerate(supervised) if ok]
    return {"discrepancy": [discrepancy[i] for i in kept],
            "selected_discrepancy": [discrepancy[i] for i in sorted(set(active))
                                     if supervised[i]],
            "terms": {name: [term[i].item() for i in kept] for name, term in terms.items()},
            "term_share": dict(summary["term_share"])}


# ---- drawing ---------------------------------------------------------------------------------

def _plot_lines(ax, data: dict, names, ylabel: str) -> None:
    for name in names:
        if name in data:
            ax.plot(data["step"], data[name], label=name, marker="." if len(data["step"]) < 30
                    else "", **STYLE[name])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)


def _plot_training(stage_dir: str, report: dict) -> list[str]:
    plt = _pyplot()
    stage = report.get("stage", os.path.basename(stage_dir))
    written = []
    losses = loss_data(report)
    if not losses["step"]:
        return written  # nothing logged (a stage shorter than logging_steps)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    _plot_lines(ax, losses, (LOSS_KEY, *PAIR_LOSSES), "training loss (nats/token)")
    ax.set_title(f"{stage}: loss per step", fontsize=10)
    fig.tight_layout()
    _save(fig, os.path.join(stage_dir, LOSS_PLOT))
    written.append(LOSS_PLOT)
    statistics = entropy_data(report)
    if any(name in statistics for name in PAIR_STATISTICS):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
        _plot_lines(top, statistics, PAIR_STATISTICS[:2], "mean entropy (nats)")
        _plot_lines(bottom, statistics, PAIR_STATISTICS[2:], "mixed fraction")
        top.set_xlabel("")
        top.set_title(f"{stage}: entropies and mixed fraction per step", fontsize=10)
        fig.tight_layout()
        _save(fig, os.path.join(stage_dir, ENTROPY_PLOT))
        written.append(ENTROPY_PLOT)
    return written


def _plot_selection(stage_dir: str, report: dict) -> list[str]:
    plt = _pyplot()
    data = selection_data(stage_dir)
    stage = report.get("stage", os.path.basename(stage_dir))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    values = data["discrepancy"]
    if values:
        low, high = min(values), max(values)
        bins = HISTOGRAM_BINS if high > low else 1
        span = (low, high) if high > low else (low - 0.5, high + 0.5)
        left.hist(values, bins=bins, range=span, color="tab:gray", alpha=0.6,
                  label=f"all scored ({len(values)})")
        left.hist(data["selected_discrepancy"], bins=bins, range=span, color="tab:blue",
                  alpha=0.6, label=f"active set ({len(data['selected_discrepancy'])})")
    left.axvline(0.0, color="black", linewidth=0.8)
    left.set_xlabel("dH = H_strong - H_weak (nats)")
    left.set_ylabel("examples")
    left.set_title(f"{stage}: entropy discrepancy", fontsize=10)
    left.legend(fontsize=9)
    left.grid(True, alpha=0.3)
    for name, term in data["terms"].items():
        share = data["term_share"].get(name, 0.0)
        right.scatter(values, term, s=6, alpha=0.5,
                      label=f"{TERM_LABELS[name]}: {100 * share:.1f}% of the mass",
                      color=STYLE[name]["color"])
    right.set_xlabel("dH = H_strong - H_weak (nats)")
    right.set_ylabel("weight term (unnormalised)")
    right.set_title(f"{stage}: WD-DS weight terms per example", fontsize=10)
    right.legend(fontsize=9)
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, os.path.join(stage_dir, SELECTION_PLOT))
    return [SELECTION_PLOT]


def plot_stage(stage_dir: str, report: dict) -> list[str]:
    """Draw the plots of one finished stage into ``stage_dir``; returns their file names.

    ``report`` is the stage's ``report.json`` document: a selection stage (``"active"`` in it)
    is drawn from its files, a training stage from ``report["log"]``. Needs matplotlib.

    Raises:
        ImportError: matplotlib is missing. ValueError: a file the plot needs is unreadable.
    """
    if "active" in report:
        return _plot_selection(stage_dir, report)
    return _plot_training(stage_dir, report)


def demo_comparison_data(summary: dict) -> dict:
    """What ``wmss demo``'s ``comparison.png`` draws, from its ``demo_result.json`` document:
    ``{"seeds": [int], "accuracy": {"sft": [%], "wmss": [%]}, "loss": {"sft", "wmss":
    [nats/token]}, "mean": ..., "std": ...}`` (per seed in seed order; accuracy in percent)."""
    runs = summary["runs"]
    return {"seeds": [run["seed"] for run in runs],
            "accuracy": {arm: [100 * run[f"{arm}_accuracy"] for run in runs]
                         for arm in ("sft", "wmss")},
            "loss": {arm: [run[f"{arm}_loss"] for run in runs] for arm in ("sft", "wmss")},
            "mean": summary["mean"], "std": summary["std"]}


def plot_demo_comparison(path: str, summary: dict) -> None:
    """``wmss demo``'s comparison: both arms' held-out exact match and loss, a bar per seed
    (``demo_comparison_data``), written atomically to ``path``."""
    plt = _pyplot()
    data = demo_comparison_data(summary)
    names = {"sft": "SFT, 2 epochs", "wmss": "WMSS, 1 SFT + 1 WMSS epoch"}
    seeds = data["seeds"]
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 3.0 + 1.2 * len(seeds)), 4.4))
    width = 0.38
    for ax, metric, label, scale in ((axes[0], "accuracy", "held-out exact match (%)", 100),
                                     (axes[1], "loss", "held-out loss (nats/token)", 1)):
        for offset, arm in ((-width / 2, "sft"), (width / 2, "wmss")):
            mean, std = data["mean"][arm][metric], data["std"][arm][metric]
            spread = "" if std is None else f" +- {scale * std:.{1 if scale == 100 else 3}f}"
            ax.bar([i + offset for i in range(len(seeds))], data[metric][arm], width,
                   label=f"{names[arm]}: {scale * mean:.{1 if scale == 100 else 3}f}{spread}",
                   **STYLE[arm])
        ax.set_xticks(range(len(seeds)), [f"seed {seed}" for seed in seeds])
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # off the bars
    axes[0].set_ylim(0, 100)
    fig.suptitle("wmss demo: same base model, same epoch budget"
                 + (f" ({len(seeds)} seeds, mean +- sample std)" if len(seeds) > 1 else ""),
                 fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_run(run_dir: str) -> dict:
    """Redraw every stage of a finished run from its ``report.json`` files; returns
    ``{stage: [paths]}``."""
    from .pipeline import REPORT_FILE

    run = _read_json(os.path.join(run_dir, REPORT_FILE))
    drawn = {}
    for stage in run["stages"]:
        stage_dir = os.path.join(run_dir, stage["stage"])
        report = _read_json(os.path.join(stage_dir, REPORT_FILE))
        drawn[stage["stage"]] = [os.path.join(stage_dir, name)
                                 for name in plot_stage(stage_dir, report)]
    return drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wmss.recipe.plots",
                                     description="redraw the plots of a finished wmss train run")
    parser.add_argument("run_dir", help="the run's --output-dir")
    args = parser.parse_args(argv)
    reason = plotting_unavailable()
    if reason:
        parser.error(f"cannot plot: {reason}")
    for paths in plot_run(args.run_dir).values():
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
