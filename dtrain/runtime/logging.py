"""Rank 0's record of a run: `metrics.jsonl` (always), the trackers (W&B unless disabled, TensorBoard,
MLflow), `config.yaml`, evaluation reports, and progress on the console.

Only rank 0 builds a `RunLogger`, and it hands the trackers to a process of their own
(`dtrain.outputs.trackers`): no training process imports wandb, tensorboard or mlflow. The W&B run id lives
in `<run_dir>/wandb/run-id` (MLflow's in `mlflow/run-id`): a resumed or requeued job in the same run
directory continues the same run. Steps that a resume replays (those after its checkpoint that an
earlier attempt had logged) are not logged again, anywhere.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import secrets
import string
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, cast

import yaml

from dtrain.core import metrics
from dtrain.core.contract import WorkerEnv
from dtrain.core.rundir import RUN_ID, RunDir, write_atomically
from dtrain.core.wandb_mode import wandb_mode
from dtrain.errors import UsageError
from dtrain.outputs import trackers
from dtrain.runtime import dist as dist_utils

PROGRESS_LINE_EVERY_S = 10.0  # plain progress lines (no terminal): at most one per this many seconds


def written(path: Path, write: Callable[[], Any]) -> bool:
    """Run `write`; if the disk refuses (full, failing), say so once per file and go on: rank 0's records
    are worth losing rather than the run (a checkpoint that cannot be written stops it)."""
    try:
        write()
        return True
    except OSError as exc:
        if path not in _unwritable:
            _unwritable.add(path)
            with contextlib.suppress(OSError):  # stderr may be a file on that same disk
                print(f"dtrain: cannot write {path} ({exc.strerror or exc}); training goes on without it.",
                      file=sys.stderr, flush=True)
        return False


_unwritable: set[Path] = set()


class MetricsWriter:
    """Appends rows to `<run_dir>/metrics.jsonl` (`dtrain.core.metrics` is its schema; resumes continue it).
    Once a row cannot be written it writes no more, so that no row is cut in the middle of the file."""

    def __init__(self, path: Path):
        self.path = path
        self._file: IO[str] | None = None

        def open_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)

        written(path, open_file)

    def write(self, row: Mapping[str, Any]) -> None:
        file = self._file
        if file is not None and not written(self.path, lambda: file.write(json.dumps(row) + "\n")):
            self.close()

    def close(self) -> None:
        if self._file is not None:
            written(self.path, self._file.close)
            self._file = None


def write_config(path: Path, config: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """config.yaml, replaced whole: it is written again as the run learns more (blocks, FLOPs)."""
    written(path, lambda: write_atomically(path, config_text(config, sources)))


def config_text(config: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    """The YAML of `config`, each launch option that `sources` names followed by where it was set, as in
    `  timeout: 30  # from DTRAIN_TIMEOUT_S` (one line per key: no value is folded onto the next)."""
    lines = yaml.safe_dump(dict(config), sort_keys=False, width=float("inf")).splitlines()
    section = None
    for n, line in enumerate(lines):
        if not line.startswith(" "):
            section = line.split(":", 1)[0]
        key = line.strip().split(":", 1)[0]
        if section == "launch" and line.startswith("  ") and not line.startswith("   ") and key in sources:
            lines[n] = f"{line}  # from {sources[key]}"
    return "\n".join(lines) + "\n"


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B run id, created on first use (8 characters, like wandb's own)."""
    path = RunDir(run_dir).wandb / RUN_ID
    existing = path.read_text().strip() if path.is_file() else ""
    if existing:
        return existing
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    written(path, lambda: write_atomically(path, run_id + "\n"))
    return run_id


class RunLogger:
    def __init__(self, run_dir: Path, env: WorkerEnv, run_config: Mapping[str, Any]):
        self.run_dir = run_dir
        self.metrics = MetricsWriter(RunDir(run_dir).metrics)
        self.logged_before: dict[str, int] = {}  # after a resume: each kind's last step an earlier attempt logged
        mode, notice = wandb_mode(env.wandb, os.environ)
        if notice:  # only when `auto` was left to this process (plain torchrun): dtrain launch decides it itself
            print(f"dtrain: {notice}", file=sys.stderr, flush=True)
        init = {
            "wandb": dict(dir=str(run_dir), id=wandb_run_id(run_dir), resume="allow", mode=mode, project=env.wandb_project,
                          entity=env.wandb_entity, group=env.wandb_group, tags=list(env.tags) or None,
                          name=run_dir.name, config=dict(run_config)) if mode != "disabled" else None,
            "tensorboard": {} if env.tensorboard else None,
            "mlflow": dict(**trackers.mlflow_store(env.mlflow, os.environ, run_dir), experiment=env.mlflow_experiment,
                           run_name=run_dir.name, tags={"group": env.wandb_group} if env.wandb_group else None,
                           params=mlflow_params(run_config)) if env.mlflow else None,
        }
        self.trackers: TrackerProcess | None = None
        if any(tracker is not None for tracker in init.values()):
            self.trackers = TrackerProcess({"run_dir": str(run_dir), **init})
            dist_utils.on_uncaught_error(self._mark_failed)

    def resumed(self) -> None:
        """Called once a checkpoint is loaded: from now on, rows at steps an earlier attempt logged are replays."""
        try:
            rows = metrics.read(self.run_dir)
        except UsageError:
            rows = []
        for row in rows:
            self.logged_before[row["kind"]] = max(row["step"], self.logged_before.get(row["kind"], -1))

    def _replayed(self, kind: str, step: int) -> bool:
        return step <= self.logged_before.get(kind, -1)

    def _mark_failed(self, _exc: BaseException) -> None:
        """After an uncaught exception: end the trackers' runs as failed, not finished."""
        if self.trackers is not None:
            self.trackers.finish(exit_code=1)
            self.trackers = None

    def log(self, step: int, kind: str, values: Mapping[str, float]) -> None:
        if self._replayed(kind, step):
            return
        row = metrics.row(step, kind, values)
        self.metrics.write(row)
        if self.trackers is not None:
            self.trackers.send({"row": row})

    def log_evaluation(self, step: int, epoch: int, result: Mapping[str, Any]) -> Path:
        """Write the report and confusion matrix to `eval/epoch_NNN.json`; log them to W&B as tables."""
        path = RunDir(self.run_dir).evaluation(epoch)
        record = {"step": step, "epoch": epoch, **result}
        written(path, lambda: write_atomically(path, json.dumps(record, indent=1)))
        if self.trackers is not None and not self._replayed(metrics.EPOCH, step):
            self.trackers.send({"step": step, "evaluation": dict(result)})
        return path

    def close(self) -> None:
        self.metrics.close()
        if self.trackers is not None:
            self.trackers.finish(exit_code=0)
            self.trackers = None


def mlflow_params(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's parameters for MLflow: the recipe's own, then dtrain's launch options under `dtrain.`."""
    launch = {f"dtrain.{k}": v for k, v in run_config.get("launch", {}).items() if v not in (None, [], ())}
    return {**run_config.get("config", {}), **launch, "dtrain.world_size": run_config.get("world_size")}


class TrackerProcess:
    """The trackers' runs, held by a `dtrain.outputs.trackers` process (see there why).

    Training does not wait for a tracker to start (seconds: importing it, starting wandb-core): rows
    queue in the pipe meanwhile. A tracker that fails says so itself and is dropped; when none is
    left the process ends, and rows go on to metrics.jsonl alone.
    """

    PIPE_BYTES = 1 << 20  # room for thousands of rows while the process, at low priority, lags behind

    def __init__(self, init: Mapping[str, Any]):
        self._process = subprocess.Popen([sys.executable, "-m", "dtrain.outputs.trackers"], stdin=subprocess.PIPE, text=True,
                                         start_new_session=True)
        self._pipe = cast(IO[str], self._process.stdin)  # stdin=PIPE: never None
        try:
            fcntl.fcntl(self._pipe.fileno(), fcntl.F_SETPIPE_SZ, self.PIPE_BYTES)
        except OSError:
            pass
        self.send(init)
        atexit.register(self.finish, 0)  # a recipe that never calls ctx.close() still ends its runs as finished

    def send(self, message: Mapping[str, Any]) -> None:
        if self._pipe.closed:
            return
        try:
            self._pipe.write(json.dumps(message) + "\n")
            self._pipe.flush()
        except BrokenPipeError:  # every tracker stopped (each said why): the unsent rest goes nowhere
            with contextlib.suppress(BrokenPipeError):
                self._pipe.close()

    def finish(self, exit_code: int) -> None:
        """End the runs (once); waits until every tracker has written everything."""
        if self._process.returncode is not None:
            return
        self.send({"exit_code": exit_code})
        if not self._pipe.closed:
            with contextlib.suppress(BrokenPipeError):
                self._pipe.close()
        self._process.wait()


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

    def update(self, epoch: int, epochs: int, batch: int, batches: int | None, step: int, loss: float,
               samples_per_s: float) -> None:
        text = f"epoch {epoch}/{epochs} | batch {batch}/{batches} | step {step} | loss {loss:.4f} | {samples_per_s:,.0f} samples/s"
        if self.stream is not None:
            width = 24
            done = int(width * batch / max(batches or batch, 1))
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
