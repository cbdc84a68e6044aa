"""Rank 0's experiment trackers (W&B, TensorBoard, MLflow): sinks of one process of its own.

    python -m dtrain.outputs.trackers   # started by `RunLogger`, fed JSON lines on stdin

A tracker's client costs the caller Python time per logged row (W&B's about a millisecond, and its
service more CPU on top; MLflow's an HTTP request). In the training process that work would compete
with the training loop for the GIL and for cores the loop keeps busy; here it runs only on the
cycles training leaves idle (SCHED_IDLE), reads its input once a second, and catches up when the
run ends. The training process imports none of them. This module lives outside `dtrain.runtime`
so that it does not import torch, and runs in a session of its own: torchrun's SIGTERM to rank 0's
process group does not reach it, so it ends only by its input, and a run that rank 0 ends as
failed is recorded so.

Protocol, one JSON object per line. In: first `{"run_dir": ..., "wandb": {wandb.init arguments} |
null, "tensorboard": {} | null, "mlflow": {"uri", "experiment", "run_name", "tags", "params"} |
null}`; then `{"row": {...}}` (a metrics.jsonl row, `dtrain.core.metrics`), `{"step": N, "evaluation":
{...}}`, and last `{"exit_code": C}`. End of input without an exit code (the training process
died) ends the runs as failed. A tracker that cannot start, or fails later, is dropped with one
line on stderr; the others, and metrics.jsonl, go on.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from dtrain.core import metrics
from dtrain.core.rundir import RUN_ID, RunDir, write_atomically

# Rows are read once a second, in batches: every wake-up of this process (and of wandb-core after
# it) preempts a loop that keeps the cores busy (the MNIST recipe logging every step on 2 cores:
# 7.7-9.5% fewer steps/s with rows read one by one, 2.6-4.5% in batches; bench/RESULTS.md).
BATCH_INTERVAL_S = 1.0
# Unless the user chose: MLflow retries a request 7 times with doubling back-off by default, minutes
# before a server that is down counts as down while the run's end waits for this process; and its
# INFO lines (creating a store's tables) are not for the training console.
MLFLOW_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_LOGGING_LEVEL": "WARNING"}


def redact(text: str) -> str:
    """`text` without the password a URI in it may carry (https://user:token@host -> https://user:***@host)."""
    return re.sub(r"([A-Za-z][\w+.-]*://[^/:@\s]*):[^/@\s]*@", r"\1:***@", text)


def mlflow_store(requested: str, environ: Mapping[str, str], run_dir: str | Path) -> dict[str, str | None]:
    """The tracking URI, and where a new experiment keeps its artifacts (None: where the store says).
    `--mlflow` without a URI: MLFLOW_TRACKING_URI if set, else a SQLite store in the run directory, with
    its artifacts beside it (not in ./mlruns of wherever the job was started)."""
    uri = environ.get("MLFLOW_TRACKING_URI") if requested == "auto" else requested
    if uri:
        return {"uri": uri, "artifact_location": None}
    local = RunDir.of(Path(run_dir).resolve())
    return {"uri": f"sqlite:///{local.mlflow_db}", "artifact_location": (local.mlflow / "artifacts").as_uri()}


def numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The series of a metrics row that a tracker can plot."""
    return {k: float(v) for k, v in metrics.series(row).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbSink:
    label = "W&B"

    def __init__(self, arguments: Mapping[str, Any], run_dir: Path):
        import wandb

        # Process-wide, not only this run's: wandb's usage telemetry goes to W&B's server (a DNS lookup
        # at the least, and the per-row cost of recording it) unless the whole process is offline.
        wandb.setup(wandb.Settings(mode=arguments["mode"]))
        self.wandb = wandb
        self.run = wandb.init(**arguments, settings=wandb.Settings(console="off"))

    def rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            self.run.log(metrics.series(row), step=row["step"])

    def evaluation(self, step: int, result: Mapping[str, Any]) -> None:
        self.run.log(evaluation_tables(self.wandb, result), step=step)

    def finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def evaluation_tables(wandb: Any, result: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation's confusion matrix and per-class report as W&B tables."""
    classes = list(result["report"]["classes"])
    matrix = wandb.Table(columns=["true", *classes],
                         data=[[c, *row] for c, row in zip(classes, result["confusion_matrix"])])
    report = wandb.Table(columns=["class", "precision", "recall", "f1", "support"],
                         data=[[c, r["precision"], r["recall"], r["f1"], r["support"]]
                               for c, r in result["report"]["classes"].items()])
    return {"eval/confusion_matrix": matrix, "eval/report": report}


class TensorBoardSink:
    """Event files in `<run_dir>/tensorboard/`, through TensorBoard's own writer (no torch, no TensorFlow).
    A resumed run adds a file; readers merge a folder's files by step."""

    label = "TensorBoard"

    def __init__(self, arguments: Mapping[str, Any], run_dir: Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.event_pb2, self.summary_pb2 = event_pb2, summary_pb2
        self.writer = EventFileWriter(str(RunDir(run_dir).tensorboard))

    def rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            values = [self.summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in numbers(row).items()]
            if values:
                self.writer.add_event(self.event_pb2.Event(wall_time=row.get("time") or time.time(), step=row["step"],
                                                           summary=self.summary_pb2.Summary(value=values)))
        self.writer.flush()

    def evaluation(self, step: int, result: Mapping[str, Any]) -> None:
        pass  # its scalars come as rows; TensorBoard has no table for the report

    def finish(self, exit_code: int) -> None:
        self.writer.close()


class MlflowSink:
    """One MLflow run per run directory, its id in `<run_dir>/mlflow/run-id`: a resumed or requeued job
    continues it. Parameters once, metrics in batches, and at the end the report's plots and the model."""

    label = "MLflow"
    BATCH = 1000  # MLflow's limit of metrics per request

    def __init__(self, arguments: Mapping[str, Any], run_dir: Path):
        for key, value in MLFLOW_SETTINGS.items():
            os.environ.setdefault(key, value)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.run_dir = run_dir
        self.client = MlflowClient(tracking_uri=arguments["uri"])
        self.id_file = RunDir(run_dir).mlflow / RUN_ID
        existing = self._existing_run()
        if existing is not None:
            self.run_id: str = existing
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self._experiment(arguments["experiment"], arguments["artifact_location"])
        self.run_id = self.client.create_run(experiment, run_name=arguments["run_name"],
                                             tags=arguments.get("tags") or None).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in arguments.get("params", {}).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        write_atomically(self.id_file, self.run_id + "\n")

    def _existing_run(self) -> str | None:
        """The run this run directory started before, if the store still has it."""
        run_id = self.id_file.read_text().strip() if self.id_file.is_file() else ""
        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
            return run_id
        except Exception:  # another store, or the run was deleted: start a new one
            return None

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # another run made it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        batch = [self.Metric(k, v, int((row.get("time") or time.time()) * 1000), row["step"])
                 for row in rows for k, v in numbers(row).items()]
        for i in range(0, len(batch), self.BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + self.BATCH])

    def evaluation(self, step: int, result: Mapping[str, Any]) -> None:
        pass  # the report and confusion matrix come at the end, as the report's plots

    def finish(self, exit_code: int) -> None:
        if exit_code == 0:
            for path in report_plots(self.run_dir):
                self.client.log_artifact(self.run_id, str(path), artifact_path="report")
            model = RunDir(self.run_dir).model
            if model.is_file():
                self.client.log_artifact(self.run_id, str(model))
        self.client.set_terminated(self.run_id, "FINISHED" if exit_code == 0 else "FAILED")


def report_plots(run_dir: Path) -> list[Path]:
    """`dtrain report`'s PNGs of the run (none without matplotlib)."""
    try:
        from dtrain.outputs import report

        records, evaluations = report.read_run(run_dir)
        return list(report.plot(run_dir, records, evaluations))
    except Exception as exc:
        warn(f"the report's plots were not made ({type(exc).__name__}: {exc}), so MLflow gets none.")
        return []


SINKS: dict[str, type[WandbSink | TensorBoardSink | MlflowSink]] = {"wandb": WandbSink, "tensorboard": TensorBoardSink,
                                                                     "mlflow": MlflowSink}


def wait_for_lock(path: Path) -> IO[bytes] | None:
    """Hold `path` locked (flock) until this process ends; None if the file cannot be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "ab")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle
    except OSError:
        return None


def warn(text: str) -> None:
    print(f"dtrain: {text}", file=sys.stderr, flush=True)


def lowest_priority() -> None:
    """SCHED_IDLE (Linux): run only when a core would otherwise idle; nice 19 elsewhere. Inherited
    by wandb-core. Nice 19 alone still takes a few percent from a loop that keeps every core busy."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except OSError:
            pass


def line_batches(fd: int, interval: float) -> Iterator[list[bytes]]:
    """The whole lines written to `fd`, in batches: whatever is there, at most once per `interval`."""
    pending = b""
    while chunk := os.read(fd, 1 << 20):
        *lines, pending = (pending + chunk).split(b"\n")
        if lines:
            yield lines
        time.sleep(interval)


class Trackers:
    """The sinks that started; one that fails is dropped with a line that says why.

    One process per run directory at a time: after a crash, the crashed attempt's process may still be
    ending its runs when the next attempt starts, and the next must continue those runs, not race them.
    """

    def __init__(self, init: Mapping[str, Any]):
        self.sinks: list[Any] = []
        run_dir = Path(init["run_dir"])
        self._lock = wait_for_lock(RunDir(run_dir).trackers_lock)
        for name, sink in SINKS.items():
            if init.get(name) is not None:
                self._call(sink.label, lambda: self.sinks.append(sink(init[name], run_dir)))

    def _call(self, label: str, action: Callable[[], Any]) -> bool:
        try:
            action()
            return True
        except Exception as exc:
            reason = redact(f"{type(exc).__name__}: {exc}".splitlines()[0])[:400]
            warn(f"{label} stopped ({reason}); the run goes on without it (metrics.jsonl has every row).")
            return False

    def each(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            if not self._call(sink.label, lambda: getattr(sink, method)(*args)):
                self.sinks.remove(sink)

    def take(self, messages: Sequence[Mapping[str, Any]]) -> int | None:
        """Pass a batch of messages on (consecutive rows as one batch); the exit code, if one came."""
        rows: list[Mapping[str, Any]] = []
        exit_code = None
        for message in messages:
            if "row" in message:
                rows.append(message["row"])
                continue
            if rows:
                self.each("rows", rows)
                rows = []
            if "evaluation" in message:
                self.each("evaluation", message["step"], message["evaluation"])
            elif "exit_code" in message:
                exit_code = message["exit_code"]
        if rows:
            self.each("rows", rows)
        return exit_code


def main() -> int:
    lowest_priority()
    batches = line_batches(sys.stdin.fileno(), BATCH_INTERVAL_S)
    first = next(batches, None)
    if not first:  # the training process ended before it could start a run
        return 1
    trackers = Trackers(json.loads(first[0]))
    exit_code = 1  # unless the training process says otherwise before its end
    for batch in itertools.chain([first[1:]], batches):
        if not trackers.sinks:  # each said why it stopped; the training process's next row finds the pipe closed
            return 1
        said = trackers.take([json.loads(line) for line in batch])
        exit_code = exit_code if said is None else said
    trackers.each("finish", exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
