"""Shard-safe checkpoints: DCP shards plus dtrain's commit protocol, and exact resume.

The checkpointer saves a `Checkpointable` (the strategy says what it holds of the model and
optimizers) plus the extras and RNG states, and knows nothing of parallelism.

Save (every rank, then rank 0 commits):
  1. write into `checkpoints/step_N.partial/`: the strategy's own files if it has any, DCP shards of
     model + optimizer + scheduler/scaler state (files fsynced by DCP's writer), this rank's RNG
     state, rank 0's trainer_state.json;
  2. every rank hashes the files it wrote (rank 0 also what no rank claims: DCP's metadata, its own
     JSON); the digests meet on rank 0 (this is the barrier);
  3. rank 0 writes manifest.json, then COMMITTED, fsyncs the folder, renames it to `step_N/`,
     fsyncs `checkpoints/`, and atomically replaces LATEST; only then retention deletes old ones.
A kill at any instant leaves LATEST naming a complete checkpoint (or none at all).

Loading never runs pickled code: DCP's `.metadata` pickle goes through an allow-list unpickler
and DCP's non-tensor values through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from dtrain.core import strategies
from dtrain.core.checkpoints import (
    FORMAT,
    LATEST,
    MANIFEST,
    MARKER,
    PARTIAL,
    CheckpointError,
    checkpoint_root,
    choose_for_resume,
    committed,
    file_digest,
    partials,
    read_latest,
    read_manifest,
    retention_victims,
    step_dir_name,
    verify,
)
from dtrain.core.contract import TEST_CRASH_AT
from dtrain.core.rundir import TRAINER_STATE, fsync_dir, write_atomically

if TYPE_CHECKING:
    from torch.distributed.checkpoint import StorageWriter

    from dtrain.runtime.strategies.base import Checkpointable

# A world of one has no process group; DCP then says so on every save and load. It is expected here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

@dataclasses.dataclass
class TrainState:
    """Where training stands: optimizer steps done, and the data position within the epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of `epoch` already consumed by each rank
    world_size: int = 1
    batch_size: int = 0  # per rank; with world_size it converts `batch` when the world changes

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Read a trainer_state.json; keys of another release's state (0.1.0's wandb_run_id) are ignored."""
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data})

    def batch_on(self, world_size: int, batch_size: int) -> int:
        """The data position for a job of another shape: the same number of samples seen, rounded down."""
        if (world_size, batch_size) == (self.world_size, self.batch_size) or not batch_size:
            return self.batch
        return self.batch * self.world_size * self.batch_size // (world_size * batch_size)


FULL_BYTES = 1 << 20  # a disk with less free is full, for a checkpoint


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return FULL_BYTES


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written: one sentence, on every rank, and the job stops."""


class _NoRoom(Exception):
    """A save that would not fit in the free space."""


def _complete(path: Path) -> bool:
    try:
        verify(path, checksums=False)
    except CheckpointError:
        return False
    return True


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, rank: int, world_size: int, *, keep_last: int | None,
                 async_save: bool, strategy: str, storage: Callable[[Path], StorageWriter] | None = None):
        """`strategy` is recorded in each manifest, for `dtrain ckpt export`; `storage` makes the DCP
        StorageWriter of a checkpoint's folder (default: DCP's file writer, fsyncing every file)."""
        self.root = checkpoint_root(run_dir)
        self.rank, self.world_size = rank, world_size
        self.strategy, self.storage = strategy, storage
        self.keep_last = keep_last
        self.async_save = async_save
        # An async save on the default group hangs once DDP traffic resumes: give it its own.
        self._group = dist.new_group(backend="gloo") if async_save and world_size > 1 else None
        self._pending: tuple[Any, Path, TrainState, dict, list[Path]] | None = None
        self._saves = 0
        self._current: set[int] = set()  # steps of this run's timeline: resumed from or saved here
        if rank == 0:
            for stale in partials(self.root):
                shutil.rmtree(stale, ignore_errors=True)

    def save(self, state: TrainState, parts: Checkpointable, extras: dict[str, Any],
             metrics: dict[str, float] | None = None) -> None:
        """Write checkpoint `step_<state.step>`; with async saves, only start it (see `wait`).

        A save that fails on any rank (a full or failing disk), or that will not fit (less free space
        than the newest checkpoint takes), stops every rank together with one sentence naming the
        rank, the checkpoint, the folder and what is safe: nothing is committed, LATEST still names
        the last complete checkpoint, and the partial folder is removed.
        """
        self.wait()
        name = step_dir_name(state.step)
        if state.step in self._current:
            return
        partial = self.root / (name + PARTIAL)

        def prepare() -> None:
            if self.rank == 0:
                self._check_room(name)
                if (self.root / name).exists():
                    self._set_aside(self.root / name)
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)

        self._together(name, partial, prepare)
        self._saves += 1
        written = [partial / _rng_file(self.rank)]

        def write_own() -> None:
            _write_json(written[0], capture_rng())
            self._crash_point("started")
            if self.rank == 0:
                _write_json(partial / TRAINER_STATE, dataclasses.asdict(state))

        self._together(name, partial, write_own)
        written += parts.write_files(partial)
        state_dict = {**parts.state_dict(), "extras": extras}
        from dtrain.runtime import dcp_io

        writer = (self.storage or dcp_io.file_storage)(partial)
        if self.async_save:
            future = dcp_io.async_save(state_dict, writer, self._group)
            self._pending = (future, partial, state, dict(metrics or {}), written)
        else:
            self._dcp(name, partial, lambda: dcp_io.save(state_dict, writer))
            self._commit(partial, state, dict(metrics or {}), written)

    def wait(self) -> None:
        """Finish and commit a pending async save (the next save and the end of training call it)."""
        if self._pending is None:
            return
        future, partial, state, metrics, written = self._pending
        self._pending = None
        self._dcp(step_dir_name(state.step), partial, future.result)
        self._commit(partial, state, metrics, written)

    def _commit(self, partial: Path, state: TrainState, metrics: dict, written: list[Path]) -> None:
        """`written`: the files this rank wrote besides its DCP shards (`__<rank>_*.distcp`, DCP's naming)."""
        self._crash_point("shards")
        own = written + sorted(partial.glob(f"__{self.rank}_*.distcp"))
        digests = _digests(partial, own)
        gathered: list[dict] = [{} for _ in range(self.world_size)]
        if self.world_size > 1:
            dist.all_gather_object(gathered, digests)
        else:
            gathered = [digests]

        def commit() -> None:
            if self.rank != 0:
                return
            self._crash_point("gathered")
            files = {name: info for part in gathered for name, info in part.items()}
            files.update(_digests(partial, [p for p in _files(partial) if str(p.relative_to(partial)) not in files]))
            manifest = {"format": FORMAT, **dataclasses.asdict(state), "strategy": self.strategy,
                        "time": round(time.time(), 3), "metrics": metrics, "files": dict(sorted(files.items()))}
            _write_json(partial / MANIFEST, manifest)
            self._crash_point("manifest")
            _write_json(partial / MARKER, {"step": state.step})
            fsync_dir(partial)
            self._crash_point("marker")
            final = self.root / partial.name[: -len(PARTIAL)]
            os.rename(partial, final)
            fsync_dir(self.root)
            self._crash_point("rename")
            write_atomically(self.root / LATEST, final.name, durable=True)
            self._crash_point("latest")
            for old in retention_victims(self.root, self.keep_last):
                shutil.rmtree(old)

        self._together(step_dir_name(state.step), partial, commit)
        self._current.add(state.step)

    # --- failures: every rank stops together, in one sentence ----------------------------------------

    def _together(self, name: str, partial: Path, action: Callable[[], None]) -> None:
        """Run `action` on every rank; if it failed on any (OSError, or a save that will not fit),
        every rank stops with that rank's failure. A collective: it is also the barrier after `action`."""
        try:
            action()
            failure = None
        except OSError as exc:
            failure = f"could not write checkpoint {name} into {self.root}: {exc.strerror or exc}"
        except _NoRoom as exc:
            failure = str(exc)
        failures: list[Any] = [failure]
        if self.world_size > 1:
            failures = [None] * self.world_size
            dist.all_gather_object(failures, failure)
        first = next(((rank, f) for rank, f in enumerate(failures) if f is not None), None)
        if first is not None:
            raise self._stopped(partial, *first)

    def _dcp(self, name: str, partial: Path, save: Callable[[], Any]) -> None:
        """A DCP save: its failure on any rank reaches every rank (DCP gathers them), as one sentence."""
        from dtrain.runtime.dcp_io import CheckpointException

        try:
            save()
        except CheckpointException as exc:
            rank = min(exc.failures)
            error = exc.failures[rank][0]
            if isinstance(error, OSError) and error.strerror:
                what = error.strerror
            elif _free_bytes(self.root) < FULL_BYTES:  # torch.save's zip writer reports a full disk as a RuntimeError
                what = f"No space left on device ({_free_bytes(self.root)} bytes free)"
            else:
                what = f"{type(error).__name__}: {error}"
            if self.world_size > 1:
                dist.barrier()  # every rank has read the disk as the failure left it, before rank 0 frees the partial
            raise self._stopped(partial, rank, f"could not write checkpoint {name} into {self.root}: {what}") from None

    def _stopped(self, partial: Path, rank: int, failure: str) -> CheckpointWriteError:
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # frees its space now; the next start would remove it too
        latest = read_latest(self.root)
        safe = f"LATEST names {latest}, complete" if latest and _complete(self.root / latest) else \
            "no complete checkpoint was written yet"
        return CheckpointWriteError(f"rank {rank} {failure}; {safe}. Free space (or fix the disk) and run the same "
                                    "command to resume.")

    def _check_room(self, name: str) -> None:
        """A save takes about what the newest one took: refuse it now if the disk has less free."""
        newest = next(iter(committed(self.root)), None)
        if newest is None:
            return
        try:
            size = sum(f["size"] for f in read_manifest(newest)["files"].values())
        except CheckpointError:  # a damaged one is resume's concern, not a measure of this save
            return
        free = _free_bytes(self.root)
        if free < size:
            raise _NoRoom(f"could not start checkpoint {name}: it needs about {size / 1e6:.1f} MB (as {newest.name} "
                          f"took) and {self.root} has {free / 1e6:.1f} MB free")

    def _set_aside(self, path: Path) -> None:
        """A `step_N` from an earlier life of the run (damaged, or from a timeline resume left) is
        in the way of this save: keep it under another name rather than delete or overwrite it."""
        aside = path.with_name(f"{path.name}.replaced-{int(time.time())}")
        os.rename(path, aside)
        print(f"dtrain: {path} came from an earlier attempt of this run; kept it as {aside.name}.", flush=True)

    def resume(self, resume: str, parts: Checkpointable,
               extras: dict[str, Any]) -> tuple[Path | None, list[str], TrainState | None, dict[str, Any], dict | None]:
        """Pick the checkpoint per `resume` (auto, never, or a folder) and load it.

        Returns the folder, notes about checkpoints passed over, the train state, the extras
        (scheduler, scaler) and this rank's RNG state (None when the world size changed).
        """
        path, notes = _choose_on_rank0(self.root.parent, resume, self.rank, self.world_size)
        if path is None:
            return None, notes, None, {}, None
        state, loaded, rng = load(path, parts, extras, self.rank, self.world_size)
        self._current.add(state.step)
        return path, notes, state, loaded, rng

    def _crash_point(self, point: str) -> None:
        wanted = os.environ.get(TEST_CRASH_AT)
        if wanted and wanted == f"{point}:{self.rank}:{self._saves}":
            os.kill(os.getpid(), signal.SIGKILL)


def _choose_on_rank0(run_dir: Path, resume: str, rank: int, world_size: int) -> tuple[Path | None, list[str]]:
    """Rank 0 picks the checkpoint (verifying it) and every rank gets the same answer."""
    choice: list[Any] = [None, []]
    if rank == 0:
        try:
            picked = choose_for_resume(run_dir, resume, inspect=_read_metadata)
            notes = list(picked.notes)
            if picked.path is None and notes:
                notes.append("no usable checkpoint is left; starting from scratch.")
            choice = [picked.path, notes]
        except CheckpointError as exc:
            choice = [exc, []]
    if world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], CheckpointError):
        raise choice[0]
    return choice[0], choice[1]


def load(path: Path, parts: Checkpointable, extras: dict[str, Any], rank: int,
         world_size: int) -> tuple[TrainState, dict[str, Any], dict | None]:
    """Load a verified checkpoint into model and optimizers; return its state, extras and this rank's RNG.

    The RNG state is None when the world size changed: there is no rank to take it from.
    """
    from dtrain.runtime import dcp_io

    try:
        parts.read_files(path)
        state_dict = {**parts.state_dict(), "extras": extras}
        dcp_io.load(state_dict, path)
    except CheckpointError:
        raise
    except (Exception, dcp_io.CheckpointException) as exc:  # DCP's wrapper of every rank's error is a BaseException
        detail = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), type(exc).__name__)
        raise CheckpointError(f"checkpoint {path} does not fit this model and optimizer ({detail}); "
                              "start a new run (another --name) or pass --resume never.") from None
    parts.load_state_dict(state_dict)
    state = TrainState.from_dict(json.loads((path / TRAINER_STATE).read_text()))
    rng_file = path / _rng_file(rank)
    rng = json.loads(rng_file.read_text()) if state.world_size == world_size and rng_file.exists() else None
    return state, state_dict["extras"], rng


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's state_dict from a checkpoint of any strategy and world size, or from a model.pth file,
    in this one process on the CPU; nothing pickled runs."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    strategy = strategies.get(verify(path).get("strategy", "ddp"))  # 0.1.0 recorded no strategy
    if strategy.package and importlib.util.find_spec(strategy.package) is None:
        raise CheckpointError(f"checkpoint {path} was written under --strategy {strategy.name}, whose files only "
                              f"{strategy.package} reads; pip install 'dtrain[{strategy.package}]'.")
    from dtrain.runtime.strategies import runtime_class

    return runtime_class(strategy.name).model_weights(path)


class _KeepsWriteErrors:
    """A file that keeps the OSError of a failed write: torch.save reports it only as "unexpected pos"."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _read_metadata(path: Path) -> Any:
    """A checkpoint's DCP metadata, unpickled safely; DCP is imported only when there is a checkpoint to read."""
    from dtrain.runtime import dcp_io

    return dcp_io.read_metadata_safely(path)


def save_atomically(obj: Any, path: Path) -> None:
    """`torch.save`, written whole (`rundir.write_atomically`); a write that fails (a full disk) raises its own
    OSError."""

    def save(file: IO[bytes]) -> None:
        writer = _KeepsWriteErrors(file)
        try:
            torch.save(obj, cast(IO[bytes], writer))
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None

    write_atomically(path, save)


# --- RNG -------------------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy
    except ImportError:
        return state
    kind, keys, pos, has_gauss, gauss = cast(tuple, numpy.random.get_state(legacy=True))
    state["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "numpy" in state:
        import numpy
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, gauss))


@contextlib.contextmanager
def rng_unchanged() -> Iterator[None]:
    """Whatever runs inside draws no number that the code after it would have drawn: evaluation (a
    DataLoader draws a seed when its iterator is made) leaves training's random numbers, and so a
    resumed run, as they would have been without it."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


# --- small durable writes --------------------------------------------------------------------------

def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.json"


def _digests(folder: Path, files: list[Path]) -> dict[str, dict]:
    return {str(p.relative_to(folder)): dict(zip(("size", "sha256"), file_digest(p))) for p in files}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as fh:
        fh.write(json.dumps(value))
        fh.flush()
        os.fsync(fh.fileno())


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
