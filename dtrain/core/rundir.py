"""A run directory: every path dtrain writes or reads in one, named here once, and the one way to write a record.

Both sides use it: the launch writes the spec, the launcher's files and logs and how the launch ended;
the ranks write the config, metrics, checkpoints, hang reports and the model; `dtrain report`, `ckpt`,
`sweep` and the trackers read them back. docs/architecture.md draws the tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

DEFAULT = Path("runs")  # where a run's folder goes unless --run-dir says: runs/NAME
SPEC = "spec.json"  # a launch spec (`dtrain launch --spec FILE`): a sweep run's, or the one a cluster job's nodes run
PLAN = "sweep.json"  # a sweep's plan, in the sweep directory
SUMMARIES = ("summary.csv", "summary.json")  # a sweep's table, in the sweep directory
METRICS = "metrics.jsonl"
LATEST = "LATEST"  # in checkpoints/: the name of the newest committed checkpoint
MARKER = "COMMITTED"  # in a checkpoint: written last, so a checkpoint without it is not one
MANIFEST = "manifest.json"  # in a checkpoint: its step, strategy, metrics and every file's size and digest
TRAINER_STATE = "trainer_state.json"  # in a checkpoint: the TrainState
PARTIAL = ".partial"  # the suffix of a checkpoint being written
RUN_ID = "run-id"  # in a tracker's folder: the run it resumes
FIGURES = ("loss_lr.png", "system.png", "accuracy.png", "confusion_matrix.png")  # in report/, as `dtrain report` draws them
SWEEP_FIGURE = "sweep.png"  # in a sweep directory's report/
MODEL = "model.pth"  # the trained model's plain state_dict; also `dtrain export`'s state-dict artifact
EXPORT_RECORD = "export.json"  # beside `dtrain export`'s artifacts: their source, shapes, sizes and parity


def per_node(name: str, node_rank: int) -> str:
    """One file per node for what each node writes, since nodes may share the run directory: launcher.log on
    node 0, launcher-node1.log on node 1."""
    stem, dot, suffix = name.partition(".")
    return name if node_rank == 0 else f"{stem}-node{node_rank}{dot}{suffix}"


@dataclasses.dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, path: str | os.PathLike) -> RunDir:
        return cls(Path(path))

    # --- what the launch writes ------------------------------------------------------------------
    @property
    def spec(self) -> Path:
        return self.root / SPEC

    @property
    def ended(self) -> Path:
        """How the last `dtrain launch` here ended (its exit code), for sweeps that resume."""
        return self.root / "ended.json"

    @property
    def deepspeed_config(self) -> Path:
        """The merged DeepSpeed JSON that the workers read."""
        return self.root / "deepspeed.json"

    def accelerate_config(self, node_rank: int) -> Path:
        return self.root / per_node("accelerate.yaml", node_rank)

    @property
    def hostfile(self) -> Path:
        return self.root / "hostfile"

    def launch_lock(self, node_rank: int) -> Path:
        """Held by a node's `dtrain launch` (or `dtrain debug`) while it runs."""
        return self.root / per_node("launch.lock", node_rank)

    def probe(self, pid: int) -> Path:
        """A file the launch writes and removes at once, to learn that the folder is writable before starting."""
        return self.root / f".dtrain-probe-{pid}"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def launcher_log(self, node_rank: int) -> Path:
        """The launcher's own output."""
        return self.logs / per_node("launcher.log", node_rank)

    @property
    def console_log(self) -> Path:
        """A sweep run's console, when several runs share the terminal."""
        return self.logs / "console.log"

    def attempt_logs(self, name: str, launcher: str) -> Path:
        """Where a launcher of dtrain's own keeps each rank's output: torchrun's layout, so every launch reads alike."""
        return self.logs / f"{name}_{launcher}" / "attempt_0"

    @staticmethod
    def rank_log(folder: Path, rank: int, stream: str) -> Path:
        """A rank's stdout or stderr in an attempt's folder (`attempt_logs`)."""
        return folder / str(rank) / f"{stream}.log"

    def error_record(self, rank: int) -> Path:
        """A rank's uncaught exception (`dtrain.runtime.dist` writes it; the launch reads it to name the rank)."""
        return self.logs / "errors" / f"rank{rank}.json"

    def node_record(self, node_rank: int) -> Path:
        """A node's arrival at the rendezvous."""
        return self.logs / "nodes" / f"node{node_rank}.json"

    def engine_dir(self, engine: str) -> Path:
        """A cluster engine's files for this run's job (its script, the spec every node launches, its output)."""
        return self.root / engine

    # --- what the ranks write --------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def exports(self) -> Path:
        """`dtrain export`'s default --out."""
        return self.root / "export"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def evaluation(self, epoch: int) -> Path:
        return self.evaluations / f"epoch_{epoch:03d}.json"

    @property
    def evaluations(self) -> Path:
        return self.root / "eval"

    @property
    def debug(self) -> Path:
        """Hang reports: each rank's state and stacks."""
        return self.root / "debug"

    def rank_state(self, rank: int) -> Path:
        return self.debug / f"rank{rank}.json"

    def rank_stacks(self, rank: int) -> Path:
        return self.debug / f"rank{rank}-stacks.txt"

    @property
    def flight_recorder(self) -> Path:
        """The prefix of the Flight Recorder's dumps (torch adds the rank)."""
        return self.debug / "flight-recorder-rank"

    @property
    def traces(self) -> Path:
        return self.root / "traces"

    @property
    def preflight(self) -> Path:
        """`dtrain doctor`'s preflight result."""
        return self.root / "preflight.json"

    # --- trackers and reports --------------------------------------------------------------------
    @property
    def trackers_lock(self) -> Path:
        """Held by the run's trackers process."""
        return self.root / "trackers.lock"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def mlflow(self) -> Path:
        """MLflow's run id, and the local store (mlflow.db, artifacts/) when no tracking server was given."""
        return self.root / "mlflow"

    @property
    def mlflow_db(self) -> Path:
        return self.mlflow / "mlflow.db"

    @property
    def report(self) -> Path:
        return self.root / "report"

    # --- a sweep directory -----------------------------------------------------------------------
    @property
    def plan(self) -> Path:
        return self.root / PLAN

    def summaries(self) -> tuple[Path, Path]:
        return self.root / SUMMARIES[0], self.root / SUMMARIES[1]


def write_atomically(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], Any],
                     durable: bool = False) -> None:
    """Write `data` (text, bytes, or a function that writes into the binary file it is given) to a file of this
    process's own, then rename it over `path`: a reader (or another node writing the same file) never sees half
    of it. A write that fails (a full disk) leaves no partial file, and `path` as it was. `durable`: on disk
    before the rename, and the rename itself on disk before returning (what a checkpoint's LATEST needs)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w" if isinstance(data, str) else "wb") as fh:
            data(fh) if callable(data) else fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(Path(path).parent)


def write_json_atomically(path: str | os.PathLike, record: dict) -> bool:
    """Whether `record` was written (`write_atomically`: the launcher reads the file while ranks write theirs)."""
    try:
        write_atomically(path, json.dumps(record))
        return True
    except OSError:
        return False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
