"""Process group and device: nccl on CUDA, gloo on CPU, with a timeout so a hang becomes an error."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist

from dtrain.errors import UsageError
from dtrain.runtime.env import WorkerEnv

DEFAULT_TIMEOUT_S = 600


def pick_device(env: WorkerEnv) -> torch.device:
    kind = env.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("DTRAIN_DEVICE=cuda but torch sees no CUDA device; launch with --cpu.")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def check_world(env: WorkerEnv) -> None:
    """Stop unless the launcher made this process one rank of the world `dtrain launch` asked for:
    a launcher misconfigured into starting N independent trainings is caught here, not after them."""
    if env.launched_world_size is not None and env.launched_world_size != env.world_size:
        raise UsageError(f"this process was started as one of a world of {env.world_size}, but dtrain launched "
                         f"{env.launched_world_size} processes: the launcher did not join them into one job; "
                         "check its configuration, or use the default launcher (torchrun).")


def init_process_group(env: WorkerEnv, device: torch.device) -> None:
    """Join the job's process group when there is more than one rank. A world of one needs none,
    except for DeepSpeed, which always wants one: it gets a group of one on an in-memory store."""
    if dist.is_initialized():
        return
    if env.world_size == 1:
        if env.strategy.startswith("zero"):
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    timeout = datetime.timedelta(seconds=float(os.environ.get("DTRAIN_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(
        store=_attempt_store(env.world_size, timeout),
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )


def _attempt_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, a store namespace of this restart attempt's own.

    torchrun hands every attempt the same agent store, so after a restart (--max-restarts) the
    new workers read the dead workers' addresses and fail to connect (pytorch/pytorch#167288).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dtrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def install_error_hook(rank: int) -> None:
    """Record an uncaught exception where torchrun and `dtrain launch` look for it.

    The file (TORCHELASTIC_ERROR_FILE) lets the launcher name the rank that failed first. A
    rank that only fails because a peer died prints one line instead of a second traceback,
    and a `UsageError` (a bad checkpoint, say) is one sentence, never a traceback.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        usage = issubclass(exc_type, UsageError)
        text = str(exc) if usage else "".join(traceback.format_exception(exc_type, exc, tb))
        _write_error_file(rank, str(exc) if usage else f"{exc_type.__name__}: {exc}", text, usage)
        if usage:
            print(f"dtrain: error: {exc}", file=sys.stderr)
        elif issubclass(exc_type, dist.DistBackendError) or _peer_vanished(exc):
            print(f"rank {rank}: stopped because another rank failed ({exc_type.__name__}).", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)
        for callback in _failure_callbacks:
            callback()

    sys.excepthook = hook


_failure_callbacks: list[Callable[[], None]] = []


def on_uncaught_error(callback: Callable[[], None]) -> None:
    """Run `callback` after the error hook has reported an uncaught exception (e.g. mark a W&B run failed)."""
    _failure_callbacks.append(callback)


def _peer_vanished(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("Connection closed by peer" in text or "Connection reset by peer" in text)


def _write_error_file(rank: int, message: str, text: str, usage: bool) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    now = time.time()
    record = {
        "message": {"message": message, "extraInfo": {"py_callstack": text, "timestamp": str(int(now))}},
        "dtrain": {"rank": rank, "time": now, "usage": usage},
    }
    try:  # atomically: torchrun may read the file while a rank it is stopping still writes it
        with open(f"{path}.tmp", "w") as fh:
            json.dump(record, fh)
        os.replace(f"{path}.tmp", path)
    except OSError:
        pass
