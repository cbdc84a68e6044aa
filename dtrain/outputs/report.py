"""`dtrain report RUN_DIR`: plots and a text summary of a run, from its files alone.

Reads `metrics.jsonl` and the evaluation reports `eval/epoch_NNN.json`; writes PNG files into
`RUN_DIR/report/`. No torch here: the classification report is computed from a confusion
matrix, which is also what the runtime uses after gathering one across ranks.
"""

from __future__ import annotations

import collections
import io
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dtrain.core import metrics
from dtrain.core.rundir import FIGURES, SWEEP_FIGURE, RunDir, write_atomically
from dtrain.errors import UsageError


def classification_report(confusion: list[list[int]], class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows: true, columns: predicted), under
    `class_names` (scikit-learn's `target_names`; by default the class indices).

    A ratio with a zero denominator is 0, as in scikit-learn's default. Also the macro and
    support-weighted averages, and the accuracy.
    """
    classes = len(confusion)
    names = [str(c) for c in range(classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != classes:
        raise UsageError(f"the model scores {classes} classes and class_names names {len(names)}; pass one name per "
                         "class, in the order of the model's outputs.")
    support = [sum(row) for row in confusion]
    predicted = [sum(confusion[t][p] for t in range(classes)) for p in range(classes)]
    per_class = {}
    for c in range(classes):
        tp = confusion[c][c]
        precision = tp / predicted[c] if predicted[c] else 0.0
        recall = tp / support[c] if support[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[names[c]] = {"precision": precision, "recall": recall, "f1": f1, "support": support[c]}
    total = sum(support)

    def average(weights: list[float]) -> dict[str, float]:
        norm = sum(weights) or 1
        return {k: sum(w * per_class[names[c]][k] for c, w in enumerate(weights)) / norm
                for k in ("precision", "recall", "f1")}

    return {
        "classes": per_class,
        "macro_avg": average([1.0] * classes),
        "weighted_avg": average([float(s) for s in support]),
        "accuracy": sum(confusion[c][c] for c in range(classes)) / total if total else 0.0,
        "support": total,
    }


def format_report(report: dict[str, Any]) -> str:
    """The table scikit-learn's classification_report prints."""
    lines = [f"{'':>12} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}", ""]
    for name, row in report["classes"].items():
        lines.append(f"{name:>12} {row['precision']:>9.4f} {row['recall']:>9.4f} {row['f1']:>9.4f} {row['support']:>9}")
    lines.append("")
    lines.append(f"{'accuracy':>12} {'':>9} {'':>9} {report['accuracy']:>9.4f} {report['support']:>9}")
    for name in ("macro_avg", "weighted_avg"):
        row = report[name]
        label = name.replace("_", " ")
        lines.append(f"{label:>12} {row['precision']:>9.4f} {row['recall']:>9.4f} {row['f1']:>9.4f} {report['support']:>9}")
    return "\n".join(lines)


def read_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(metrics.jsonl rows, evaluation reports by epoch) of a run directory."""
    records = metrics.read(run_dir)
    evaluations = [json.loads(p.read_text()) for p in sorted(RunDir(run_dir).evaluations.glob("epoch_*.json"))]
    return records, evaluations


def _training_loss(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == metrics.TRAIN and "train/loss" in r]


def summary(run_dir: Path, records: list[dict], evaluations: list[dict]) -> str:
    train = _training_loss(records)
    lines = [f"run {run_dir.name}: {max((r['step'] for r in records), default=0)} steps, {len(evaluations)} evaluation(s)"]
    if train:
        speed = [r["samples_per_s"] for r in train if "samples_per_s" in r]
        lines.append(f"  train loss {train[0]['train/loss']:.4f} (step {train[0]['step']}) -> "
                     f"{train[-1]['train/loss']:.4f} (step {train[-1]['step']})"
                     + (f", median {sorted(speed)[len(speed) // 2]:,.0f} samples/s" if speed else ""))
    system = [r for r in records if r["kind"] == metrics.SYSTEM]
    if system:
        slowest = collections.Counter(r["slowest_rank"] for r in system).most_common(1)[0]
        compute = sorted(r["compute_s/max"] / max(r["compute_s/median"], 1e-12) for r in system)
        lines.append(f"  slowest rank {slowest[0]:.0f} in {slowest[1]} of {len(system)} intervals; its compute per step "
                     f"{compute[len(compute) // 2]:.2f}x the median rank's (median over intervals)"
                     + (f"; {statistics.median(r['tflops'] for r in system if 'tflops' in r):.3g} TFLOP/s per device"
                        if any("tflops" in r for r in system) else ""))
    if evaluations:
        best = max(evaluations, key=lambda e: e["accuracy"])
        last = evaluations[-1]
        lines.append(f"  accuracy {100 * last['accuracy']:.2f}% after epoch {last['epoch']} "
                     f"(best {100 * best['accuracy']:.2f}%, epoch {best['epoch']})")
        lines += ["", format_report(last["report"])]
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("dtrain report draws with matplotlib; pip install matplotlib (or 'dtrain[report]').") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_sweep(sweep_dir: Path, runs: dict[str, list[dict]], metric: str | None) -> Path:
    """The runs of a sweep overlaid: training loss per step, and `metric` (default: the first evaluation series
    any run logged) at each evaluation. One PNG, `report/sweep.png` in the sweep directory."""
    plt = _pyplot()
    evaluated = [k for rows in runs.values() for r in rows if r["kind"] != metrics.SYSTEM for k in r
                 if k.startswith("eval/")]
    metric = metric or (evaluated[0] if evaluated else None)
    fig, axes = plt.subplots(2 if metric else 1, 1, figsize=(9, 7 if metric else 4), sharex=True, squeeze=False)
    loss_ax = axes[0, 0]
    for name, rows in runs.items():
        train = _training_loss(rows)
        loss_ax.plot([r["step"] for r in train], [r["train/loss"] for r in train], label=name)
        if metric:
            points = [r for r in rows if metric in r and r["kind"] in (metrics.EPOCH, metrics.EVAL, metrics.TRAIN)]
            axes[1, 0].plot([r["step"] for r in points], [r[metric] for r in points], marker="o", label=name)
    loss_ax.set_ylabel("train loss")
    loss_ax.set_yscale("log")
    loss_ax.legend(fontsize=7, loc="upper right")
    if metric:
        axes[1, 0].set_ylabel(metric)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{sweep_dir.name}: {len(runs)} runs")
    return _save(fig, RunDir.of(sweep_dir).report / SWEEP_FIGURE)


def plot(run_dir: Path, records: list[dict], evaluations: list[dict]) -> list[Path]:
    """Loss and learning rate per step, accuracy per epoch, the last confusion matrix, and the ranks' compute,
    memory and TFLOP/s (the `system` rows): PNG files."""
    plt = _pyplot()
    out = RunDir(run_dir).report
    loss_lr, system_png, accuracy, confusion = FIGURES
    written = []
    train = _training_loss(records)
    if train:
        fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        loss_ax.plot([r["step"] for r in train], [r["train/loss"] for r in train])
        loss_ax.set_ylabel("train loss")
        loss_ax.set_yscale("log")
        with_lr = [r for r in train if "lr" in r]
        lr_ax.plot([r["step"] for r in with_lr], [r["lr"] for r in with_lr], color="tab:orange")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_xlabel("step")
        fig.suptitle(f"{run_dir.name}: training")
        written.append(_save(fig, out / loss_lr))
    system = [r for r in records if r["kind"] == metrics.SYSTEM]
    if system:
        written.append(_save(_system_figure(plt, run_dir.name, system), out / system_png))
    if evaluations:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([e["epoch"] for e in evaluations], [100 * e["accuracy"] for e in evaluations], marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{run_dir.name}: evaluation")
        written.append(_save(fig, out / accuracy))

        last = evaluations[-1]
        matrix = last["confusion_matrix"]
        names = list(last["report"]["classes"])
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 0.6 * len(names) + 0.8))
        ax.imshow(matrix, cmap="Blues")
        for t, row in enumerate(matrix):
            for p, count in enumerate(row):
                ax.text(p, t, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > max(map(max, matrix)) / 2 else "black")
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix, epoch {last['epoch']}")
        written.append(_save(fig, out / confusion))
    return written


def _system_figure(plt: Any, name: str, system: list[dict]) -> Any:
    """Compute per step over the ranks (min to max, median), memory, and TFLOP/s where counted."""
    steps = [r["step"] for r in system]
    memory = [key for key in ("memory/max_allocated_gb", "memory/rss_gb") if key in system[-1]][:1]
    panels = 1 + len(memory) + any("tflops" in r for r in system)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels), sharex=True, squeeze=False)
    axes = list(axes[:, 0])
    compute = axes.pop(0)
    compute.fill_between(steps, [r["compute_s/min"] for r in system], [r["compute_s/max"] for r in system],
                         alpha=0.3, label="min to max over ranks")
    compute.plot(steps, [r["compute_s/median"] for r in system], label="median rank")
    compute.set_ylabel("compute s / step")
    compute.legend(loc="upper right")
    for key in memory:
        ax = axes.pop(0)
        ax.plot(steps, [r[key] for r in system], color="tab:green")
        ax.set_ylim(bottom=0)
        ax.set_ylabel(key.removeprefix("memory/").replace("_gb", " GB"))
    if axes:
        with_flops = [r for r in system if "tflops" in r]
        axes[0].plot([r["step"] for r in with_flops], [r["tflops"] for r in with_flops], color="tab:red")
        axes[0].set_ylabel("TFLOP/s per device")
    fig.axes[-1].set_xlabel("step")
    fig.suptitle(f"{name}: system")
    return fig


def _save(fig: Any, path: Path) -> Path:
    """One PNG, written whole: a disk that refuses it gets one sentence and keeps no partial file."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.tight_layout()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    try:
        write_atomically(path, png.getvalue())
    except OSError as exc:
        raise UsageError(f"cannot write {path} ({exc.strerror or exc}); free space in {path.parent}, or report a copy "
                         "of the run directory on a disk with room.") from None
    return path
