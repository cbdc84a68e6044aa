"""Rank 0's record of a run: `metrics.jsonl` (always), Weights & Biases (unless disabled),
`config.yaml`, evaluation reports, and progress on the console.

Only rank 0 builds a `RunLogger`, so only rank 0 ever imports wandb. The W&B run id lives in
`<run_dir>/wandb/run-id` (and in every checkpoint): a resumed or requeued job continues the
same run (`resume="allow"`).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import string
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Mapping

import yaml

from dtrain import config
from dtrain.runtime import dist as dist_utils
from dtrain.runtime.env import WorkerEnv

PROGRESS_LINE_EVERY_S = 10.0  # plain progress lines (no terminal): at most one per this many seconds


class MetricsWriter:
    """Appends one JSON object per logged step to `<run_dir>/metrics.jsonl` (append: resumes continue it)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B run id, created on first use (8 characters, like wandb's own)."""
    path = run_dir / "wandb" / "run-id"
    existing = path.read_text().strip() if path.is_file() else ""
    if existing:
        return existing
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("run-id.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


class RunLogger:
    def __init__(self, run_dir: Path, env: WorkerEnv, run_config: Mapping[str, Any]):
        self.run_dir = run_dir
        self.metrics = MetricsWriter(run_dir / "metrics.jsonl")
        self.run_id = wandb_run_id(run_dir)
        mode, notice = config.wandb_mode(env.wandb, os.environ)
        if notice:  # only when `auto` was left to this process (plain torchrun): dtrain launch decides it itself
            print(f"dtrain: {notice}", file=sys.stderr, flush=True)
        self.wandb_run = None
        if mode != "disabled":
            import wandb

            dtrain_hook = sys.excepthook  # wandb.init puts its own in front, which prints tracebacks a second time
            self.wandb_run = wandb.init(
                dir=str(run_dir), id=self.run_id, resume="allow", mode=mode, project=env.wandb_project,
                entity=env.wandb_entity, group=env.wandb_group, tags=list(env.tags) or None,
                name=run_dir.name, config=dict(run_config), settings=wandb.Settings(console="off"),
            )
            sys.excepthook = dtrain_hook
            dist_utils.on_uncaught_error(self._mark_failed)
            # wandb.log costs the training loop about a millisecond; a thread of its own takes it off the loop.
            self._queue: queue.SimpleQueue = queue.SimpleQueue()
            self._sender = threading.Thread(target=self._send, name="dtrain-wandb", daemon=True)
            self._sender.start()

    def _mark_failed(self) -> None:
        """After an uncaught exception: end the W&B run as failed, not finished."""
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)
            self.wandb_run = None

    def _send(self) -> None:
        while (item := self._queue.get()) is not None and self.wandb_run is not None:
            self.wandb_run.log(item[1], step=item[0])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.metrics.write(step, metrics)
        if self.wandb_run is not None:
            self._queue.put((step, dict(metrics)))

    def log_evaluation(self, step: int, epoch: int, result: Mapping[str, Any]) -> Path:
        """Write the report and confusion matrix to `eval/epoch_NNN.json`; log them to W&B as tables."""
        path = self.run_dir / "eval" / f"epoch_{epoch:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "epoch": epoch, **result}
        path.write_text(json.dumps(record, indent=1))
        if self.wandb_run is not None:
            import wandb

            classes = list(result["report"]["classes"])
            matrix = wandb.Table(columns=["true", *classes],
                                 data=[[c, *row] for c, row in zip(classes, result["confusion_matrix"])])
            report = wandb.Table(columns=["class", "precision", "recall", "f1", "support"],
                                 data=[[c, r["precision"], r["recall"], r["f1"], r["support"]]
                                       for c, r in result["report"]["classes"].items()])
            self._queue.put((step, {"eval/confusion_matrix": matrix, "eval/report": report}))
        return path

    def close(self) -> None:
        self.metrics.close()
        if self.wandb_run is not None:
            self._queue.put(None)
            self._sender.join()
            self.wandb_run.finish()
            self.wandb_run = None


class Progress:
    """Rank 0's progress: a bar redrawn in place on a terminal, else a plain line every few seconds."""

    def __init__(self, tty: str | None):
        self.stream: IO[str] | None = None
        if tty:
            try:
                self.stream = open(tty, "w", buffering=1)
            except OSError:
                self.stream = None
        elif sys.stdout.isatty():
            self.stream = sys.stdout
        self._last_line = 0.0

    def update(self, epoch: int, epochs: int, batch: int, batches: int, step: int, loss: float,
               samples_per_s: float) -> None:
        text = f"epoch {epoch}/{epochs} | batch {batch}/{batches} | step {step} | loss {loss:.4f} | {samples_per_s:,.0f} samples/s"
        if self.stream is not None:
            width = 24
            done = int(width * batch / max(batches, 1))
            self.stream.write(f"\r[{'=' * done}{' ' * (width - done)}] {text}\x1b[K")
            self.stream.flush()
        elif time.monotonic() - self._last_line >= PROGRESS_LINE_EVERY_S:
            self._last_line = time.monotonic()
            print(text, flush=True)

    def clear(self) -> None:
        """Before a line of its own (the epoch summary): remove the bar."""
        if self.stream is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
