"""Process group and device: nccl on CUDA, gloo on CPU, with a timeout so a hang becomes an error."""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

from dtrain.core import strategies
from dtrain.core.contract import WorkerEnv, failures
from dtrain.core.hangs import timed_out
from dtrain.core.rundir import RunDir, write_json_atomically
from dtrain.errors import UsageError


def pick_device(env: WorkerEnv) -> torch.device:
    kind = env.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("DTRAIN_DEVICE=cuda but torch sees no CUDA device; launch with --cpu.")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def check_world(env: WorkerEnv) -> None:
    """Stop unless the launcher made this process one rank of the world `dtrain launch` asked for (or, with
    --min-nodes, of one it may shrink to): a launcher misconfigured into starting N independent trainings is
    caught here, not after them."""
    launched = env.launched_world_size
    if launched is not None and not (env.min_world_size or launched) <= env.world_size <= launched:
        raise UsageError(f"this process was started as one of a world of {env.world_size}, but dtrain launched "
                         f"{launched} processes: the launcher did not join them into one job; "
                         "check its configuration, or leave --launcher out.")


def keeps_global_batch(launched: int | None, world_size: int) -> bool:
    """After a shrink (--min-nodes) the global batch is kept by accumulating more where the world divides the
    launched one evenly (4 ranks to 2: twice the micro-batches per step); otherwise each rank's batch and
    accumulation are kept, and the global batch shrinks with the world."""
    return launched is not None and world_size < launched and launched % world_size == 0


def shrunk_accumulation(grad_accum: int, launched: int | None, world_size: int) -> int:
    """The accumulation after a shrink, by `keeps_global_batch`'s rule."""
    return grad_accum * launched // world_size if launched and keeps_global_batch(launched, world_size) else grad_accum


def lost_nodes(nodes: list[int], launched: int | None, world_size: int) -> list[int]:
    """The nodes (their --node-rank) of the launched world that are not in this one, from the nodes of this one."""
    if launched is None or world_size >= launched:
        return []
    return sorted(set(range(launched // (world_size // len(nodes)))) - set(nodes))


def failed_at(env: WorkerEnv) -> float | None:
    """In a restarted world, when the first rank of an earlier attempt failed (its error record in the run directory);
    None when none left one (its launcher stopped it first) or in a first world."""
    if attempt() == 0 or env.launched_world_size is None:
        return None
    earlier = [f.time for f in failures(env.run_dir, env.launched_world_size, env.launch_time or 0.0)
               if f.attempt < attempt()]
    return min(earlier, default=None)


def init_process_group(env: WorkerEnv, device: torch.device) -> None:
    """Join the job's process group when there is more than one rank. A world of one needs none,
    unless its strategy says so (DeepSpeed always wants one): it gets a group of one on an in-memory store."""
    if dist.is_initialized():
        return
    if env.world_size == 1:
        if strategies.get(env.strategy).group_of_one:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    timeout = datetime.timedelta(seconds=env.timeout)
    dist.init_process_group(
        store=_attempt_store(env.rank, env.world_size, timeout),
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, a store namespace of this restart attempt's own.

    torchrun hands every attempt the same agent store, so after a restart (--max-restarts) the
    new workers read the dead workers' addresses and fail to connect (pytorch/pytorch#167288).
    The attempt is counted per global rank in the store (every attempt starts each rank once),
    not by TORCHELASTIC_RESTART_COUNT: that is each node's own count, and a node restarted because
    another node's worker died does not count it, so the nodes would wait in different namespaces.
    """
    global _attempt
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    _attempt = store.add(f"dtrain/starts/rank{rank}", 1) - 1
    return dist.PrefixStore(f"dtrain/attempt_{_attempt}", store)


_attempt: int | None = None


def attempt() -> int:
    """This process's restart attempt (0 for the first): the one every node agrees on once the process
    group exists, before that the launcher's own count."""
    return _attempt if _attempt is not None else int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


class OwnCollective(Protocol):
    """A collective of dtrain's own, outside the process group (the shared-memory gradient all-reduce)."""

    label: str
    last: int  # how many this rank has entered
    waited_s: float  # how long this rank has waited in them for the others


_own_collectives: list[OwnCollective] = []


def count_own_collective(collective: OwnCollective) -> None:
    """Have the hang report count `collective` and the `system` rows its waits."""
    _own_collectives.append(collective)


def own_collectives() -> list[OwnCollective]:
    return list(_own_collectives)


GLOO_SETTLE_S = 0.05


def destroy_process_group() -> None:
    """Destroy the group, then let gloo's worker threads settle before the interpreter may finalize.

    `destroy_process_group` waits for the pending work through a barrier; a gloo worker thread then
    still frees that barrier and the works it held, whose tensors have Python objects, so it takes
    the GIL. If the interpreter is finalizing by then, the thread is killed inside a destructor and
    the process aborts ("terminate called without an active exception", SIGABRT) after a run that
    succeeded: 1 in 8-12 FSDP runs on 2 loaded cores, in gloo's `runLoop` (core dump). Sleeping
    releases the GIL and the core for that thread to finish."""
    if dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(GLOO_SETTLE_S)


def install_error_hook(env: WorkerEnv) -> None:
    """Record an uncaught exception where `dtrain launch` (and torchrun) look for it.

    The record names the rank that failed first. A rank that only fails because a peer died prints
    one line instead of a second traceback, and a `UsageError` (a recipe's mistake, a bad checkpoint,
    a full disk) is one sentence, never a traceback: `dtrain launch` prints it from the records, once
    whichever ranks made it, and a rank prints it itself only when no record reaches `dtrain launch`
    (plain torchrun, or nowhere to write one).
    """
    previous = sys.excepthook
    rank = env.rank

    def hook(exc_type, exc, tb):
        usage = issubclass(exc_type, UsageError)
        text = str(exc) if usage else "".join(traceback.format_exception(exc_type, exc, tb))
        message = str(exc) if usage else f"{exc_type.__name__}: {exc}"
        recorded = _write_error_records(env, message, text, usage)
        try:
            if usage:
                if not recorded:
                    print(f"dtrain: error: {exc}", file=sys.stderr)
            elif timed_out(message) and recorded:  # the waiting rank is not the culprit: the hang report names it
                print(f"rank {rank}: a collective timed out; its traceback is in "
                      f"{RunDir.of(env.run_dir).error_record(rank)}.", file=sys.stderr)
            elif issubclass(exc_type, dist.DistBackendError) or _peer_vanished(exc):
                print(f"rank {rank}: stopped because another rank failed ({exc_type.__name__}).", file=sys.stderr)
            else:
                previous(exc_type, exc, tb)
        except OSError:  # stderr is a file on a full disk: the record is what remains
            pass
        for callback in _failure_callbacks:
            callback(exc)
        if dist.is_initialized():
            atexit.register(_exit_without_teardown)

    sys.excepthook = hook


def _exit_without_teardown() -> None:
    """A failed rank's first exit handler (the last registered runs first): exit 1 before the process
    group is torn down. Its C++ destructors can abort while peers are still inside a collective
    ("terminate called without an active exception", SIGABRT: 1 in 8-14 failures on 2 loaded cores),
    which would then read as a crash of its own. The error hooks (dtrain's, then torch's, which
    prints the traceback) have all run by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


_failure_callbacks: list[Callable[[BaseException], None]] = []


def on_uncaught_error(callback: Callable[[BaseException], None]) -> None:
    """Run `callback(exc)` after the error hook has reported an uncaught exception (e.g. mark a W&B run
    failed, ask every rank for its stacks)."""
    _failure_callbacks.append(callback)


PEER_GONE = "ended while the others waited for it"  # dtrain's own collectives' words for a peer that vanished


def _peer_vanished(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(words in text for words in (
        "Connection closed by peer", "Connection reset by peer", PEER_GONE))


def _write_error_records(env: WorkerEnv, message: str, text: str, usage: bool) -> bool:
    """dtrain's record (`RunDir.error_record`: in `dtrain launch`'s spool on this node, and in the
    run directory for the other nodes), and torchelastic's error file where the launcher asks for one
    (TORCHELASTIC_ERROR_FILE: its failure summary then names the right root cause). Whether the spool's
    was written, that is, whether `dtrain launch` will show it."""
    now = time.time()
    record = {"rank": env.rank, "message": message, "time": now, "usage": usage, "attempt": attempt(),
              "traceback": None if usage else text}
    shown = env.error_spool is not None and write_json_atomically(RunDir.of(env.error_spool).error_record(env.rank), record)
    if env.launched_world_size is not None:
        write_json_atomically(RunDir.of(env.run_dir).error_record(env.rank), record)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        write_json_atomically(os.environ["TORCHELASTIC_ERROR_FILE"], {
            "message": {"message": message, "extraInfo": {"py_callstack": text, "timestamp": str(int(now))}}})
    return shown
