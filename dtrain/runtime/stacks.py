"""A rank's side of the hang report (`dtrain.core.hangs` names the files and reads them).

Two ways in, because a hung rank's main thread may sit in C code for ever:
- DUMP_SIGNAL (`dtrain stack`): faulthandler, registered at start, writes every thread's stack
  from C at once, whatever the main thread is doing.
- A collective that times out on one rank: its error hook sets a key in the job's store and
  writes its own dump; every rank's watcher thread looks for that key once a second and writes its
  dump, before the launcher stops the job. The rank that failed waits that long before it exits.
- No step for most of --timeout: the watcher writes the rank's dump without being asked, again
  while the stall lasts, so that a rank the NCCL watchdog aborts (no error hook runs) leaves one.

On NCCL, torch's Flight Recorder also dumps its own trace on a time-out (`TORCH_FR_DUMP_TEMP_FILE`
under debug/); on every backend it records each collective a rank entered, which is how the
report tells the rank that never arrived from the ranks that waited for it.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

import dtrain
from dtrain.core.contract import WorkerEnv
from dtrain.core.hangs import DUMP_SIGNAL, stacks_header, timed_out
from dtrain.core.rundir import RunDir, write_json_atomically
from dtrain.runtime import dist as dist_utils

FLIGHT_RECORDER_ENTRIES = 2000
POLL_S = 1.0
STALL = 0.8  # of --timeout without a step: the stacks are written before the collective's time-out ends the job
DUMP_KEY = "dtrain/debug/dump"
_NOT_THE_RECIPE = tuple(str(Path(p).resolve()) + os.sep for p in
                        {sysconfig.get_paths()["stdlib"], os.path.dirname(torch.__file__), os.path.dirname(dtrain.__file__)})


def enable_flight_recorder(run_dir: str) -> None:
    """Before the process group exists: record every collective (the user's settings win)."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(FLIGHT_RECORDER_ENTRIES))
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(RunDir.of(run_dir).flight_recorder))


class StackWatch:
    """Dumps this rank's stacks on DUMP_SIGNAL, and on a collective time-out anywhere in the job."""

    def __init__(self, env: WorkerEnv, step: Callable[[], int]):
        self.rank, self.run_dir, self.step = env.rank, env.run_dir, step
        self.stall_s = STALL * env.timeout
        self._file = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            path = RunDir.of(env.run_dir).rank_stacks(env.rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w")
            self._file.write(stacks_header(env.rank, os.getpid(), socket.gethostname()))
            self._file.flush()
            faulthandler.register(DUMP_SIGNAL, file=self._file, all_threads=True, chain=False)
        except OSError:
            self._file = None  # a run directory that refuses writes: no stacks, the run goes on

    def start(self) -> None:
        """Once the process group exists: watch its store for a dump request."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._thread = threading.Thread(target=self._watch, args=(dist.distributed_c10d._get_default_store(),),
                                            name="dtrain-stack-watch", daemon=True)
            self._thread.start()

    def _watch(self, store) -> None:
        """Dump when another rank asks; and while no step is taken for STALL of --timeout, every quarter of
        it (a rank that NCCL's watchdog will abort never reaches its error hook: its last dump is the report)."""
        last_step, progressed, dumped = self.step(), time.monotonic(), 0.0
        while not self._stop.wait(POLL_S):
            try:
                requested = store.check([DUMP_KEY])
            except Exception:  # the store's host is gone: nothing left to watch
                return
            if requested:
                self.dump("another rank's collective timed out")
                return
            now = time.monotonic()
            if self.step() != last_step:
                last_step, progressed = self.step(), now
            elif now - progressed > self.stall_s and now - dumped > self.stall_s / 4:
                self.dump(f"no step for {now - progressed:.0f} s")
                dumped = now

    def after_error(self, exc: BaseException) -> None:
        """From the error hook: a timed-out collective asks every rank for its stacks, then gives them
        time to write them."""
        if self._thread is None or not timed_out(str(exc)):
            return
        self._stop.set()
        try:
            dist.distributed_c10d._get_default_store().set(DUMP_KEY, str(self.rank))
        except Exception:  # the store is gone: this rank's dump is all there is
            pass
        self.dump(f"a collective timed out: {str(exc).splitlines()[0][:200]}", traceback.extract_tb(exc.__traceback__))
        time.sleep(POLL_S + 1.0)

    def dump(self, reason: str, stack: traceback.StackSummary | None = None) -> None:
        """This rank's state to rank<R>.json and every thread's stack to rank<R>-stacks.txt. `stack`:
        where the main thread was (by default, where it is now)."""
        failed_at = stack
        if stack is None:
            main = sys._current_frames().get(threading.main_thread().ident or 0)
            stack = traceback.extract_stack(main) if main else traceback.StackSummary()
        frames = [(f.filename, f.lineno, f.name) for f in stack]
        state = {"rank": self.rank, "pid": os.getpid(), "time": time.time(), "reason": reason, "step": self.step(),
                 "frames": frames, "user_frame": next((f for f in reversed(frames) if _in_recipe(f[0])), None),
                 "collectives": {**flight_recorder_counts(),
                                 **{c.label: [c.last, c.label] for c in dist_utils.own_collectives()}}}
        write_json_atomically(RunDir.of(self.run_dir).rank_state(self.rank), state)
        if self._file is None:
            return
        try:
            self._file.write(f"--- step {state['step']}, {time.strftime('%H:%M:%S')}: {reason}\n")
            if failed_at is not None:
                self._file.write("Where the main thread failed (most recent call last):\n" + "".join(failed_at.format()))
            self._file.flush()
            faulthandler.dump_traceback(self._file, all_threads=True)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def flight_recorder_counts() -> dict[str, list]:
    """Process group name -> [the newest collective's sequence number, its name], from torch's
    Flight Recorder (empty where it records nothing)."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json  # type: ignore[attr-defined]
        entries = json.loads(_dump_fr_trace_json(includeCollectives=True, onlyActive=False)).get("entries", [])
    except Exception:  # a private API: without it the report has the stacks alone
        return {}
    counts: dict[str, list] = {}
    for entry in entries:
        group = entry["process_group"][1]
        if entry["collective_seq_id"] >= counts.get(group, [0])[0]:
            counts[group] = [entry["collective_seq_id"], entry["profiling_name"]]
    return counts


def _in_recipe(filename: str) -> bool:
    path = str(Path(filename).resolve())
    return not path.startswith(_NOT_THE_RECIPE) and "site-packages" not in path and not filename.startswith("<")
