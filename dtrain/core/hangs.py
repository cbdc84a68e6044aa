"""Where every rank was when a job hung: the files ranks write under `<run_dir>/debug/`
(`dtrain.runtime.stacks` writes them), and what `dtrain launch` and `dtrain stack` make of them.
No torch here: the launch side imports this module.

- `rank<R>-stacks.txt`: a header line (`rank R pid P host H`), then every dump of all the rank's
  threads' Python stacks, newest last: faulthandler's text, which it writes even while the main
  thread is stuck in C code (a collective, a sleep).
- `rank<R>.json`: the rank's newest dump as data: its step (the count of `ctx.step()` calls), the
  main thread's frames, the innermost frame of the recipe's own code, and how many collectives it
  had entered, per process group (torch's Flight Recorder) and in dtrain's shared-memory gradient
  all-reduce. A rank that entered fewer than the others never reached the one they waited in.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dtrain.core.contract import RankFailure
from dtrain.core.rundir import RunDir

DUMP_SIGNAL = signal.SIGWINCH  # faulthandler dumps the stacks on it; a process that did not ask ignores it


def stacks_header(rank: int, pid: int, host: str) -> str:
    return f"rank {rank} pid {pid} host {host}\n"


def timed_out(message: str) -> bool:
    """A rank's error is a collective that waited out --timeout (gloo's and NCCL's words for it)."""
    lowered = message.lower()
    return "timed out waiting" in lowered or ("timed out" in lowered and "collective" in lowered)


def read_states(run_dir: str | os.PathLike, since: float) -> list[dict]:
    """The ranks' dumps written since `since` (this launch's), in rank order."""
    states = []
    for path in RunDir.of(run_dir).debug.glob("rank*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("time", 0) >= since:
            states.append(state)
    return sorted(states, key=lambda state: state["rank"])


def behind(states: list[dict]) -> dict[int, str]:
    """Rank -> the collective it never reached, that another rank had entered (a rank behind on
    several counts is named by the first)."""
    missed: dict[int, str] = {}
    labels = sorted({label for state in states for label in state.get("collectives", {})})
    for label in labels:
        counts = {state["rank"]: state.get("collectives", {}).get(label, [0, ""]) for state in states}
        newest, operation = max(counts.values(), key=lambda count: count[0])
        for rank, (count, _) in counts.items():
            if count < newest and rank not in missed:
                missed[rank] = f"{operation} #{newest} of {label} (its last: #{count})"
    return missed


def _where(frame: list | None) -> str:
    if not frame:
        return "no frame of the recipe's own code"
    filename, line, function = frame
    return f"{_relative(filename)}:{line} in {function}"


def _relative(filename: str) -> str:
    """Relative to the working directory when inside it."""
    relative = os.path.relpath(filename)
    return filename if relative.startswith("..") else relative


def hang_report(states: list[dict], run_dir: str | os.PathLike) -> list[str]:
    """What `dtrain launch` prints after a collective timed out: first the verdict, the ranks that did not reach the
    collective the others waited in (the line a user reads first names the culprit), then a line per rank."""
    if not states:
        return []
    missed = behind(states)
    lines = []
    for rank in sorted(missed):
        state = next(s for s in states if s["rank"] == rank)
        lines.append(f"dtrain: rank {rank} hung: it never reached the collective the others waited in; at step "
                     f"{state['step']} it was at {_where(state.get('user_frame'))}.")
    lines.append(f"dtrain: where each rank was when the collective timed out (every thread's stack: "
                 f"{_relative(str(RunDir.of(run_dir).debug))}/):")
    for state in states:
        doing = f"never reached {missed[state['rank']]}" if state["rank"] in missed else "waiting for the others"
        lines.append(f"  rank {state['rank']}: step {state['step']}, {doing}, at {_where(state.get('user_frame'))}")
    return lines


def live_ranks(run_dir: str | os.PathLike) -> list[tuple[int, int, str]]:
    """(rank, pid, host) of every rank that announced itself in the run's debug folder."""
    ranks = []
    for path in RunDir.of(run_dir).debug.glob("rank*-stacks.txt"):
        try:
            with open(path) as fh:
                words = fh.readline().split()
            ranks.append((int(words[1]), int(words[3]), words[5]))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(ranks)


def announced_since(run_dir: str | os.PathLike, when: float) -> bool:
    """Whether a rank wrote to its stacks file after `when` (a `dtrain debug` in the folder of a job that ended)."""
    return any(path.stat().st_mtime > when for path in RunDir.of(run_dir).debug.glob("rank*-stacks.txt"))


def dump_live_stacks(run_dir: str | os.PathLike, send: Callable[[int, int], None] = os.kill,
                     wait_s: float = 10.0) -> tuple[dict[int, str], list[str]]:
    """Ask every rank of the run on this host for its stacks (DUMP_SIGNAL) and return (rank -> the
    stacks it wrote, notes on the ranks that could not be asked), without stopping any."""
    host = socket.gethostname()
    asked: dict[int, tuple[Path, int]] = {}
    notes = []
    for rank, pid, rank_host in live_ranks(run_dir):
        if rank_host != host:
            notes.append(f"rank {rank} runs on {rank_host}: run `dtrain stack {run_dir}` there.")
            continue
        path = RunDir.of(run_dir).rank_stacks(rank)
        size = path.stat().st_size
        try:
            send(pid, DUMP_SIGNAL)
        except ProcessLookupError:
            notes.append(f"rank {rank} (pid {pid}) is not running.")
            continue
        except PermissionError:
            notes.append(f"rank {rank} (pid {pid}) belongs to another user: run `dtrain stack` as that user.")
            continue
        asked[rank] = (path, size)
    stacks: dict[int, str] = {}
    deadline = time.monotonic() + wait_s
    while asked and time.monotonic() < deadline:
        time.sleep(0.2)
        for rank, (path, size) in list(asked.items()):
            with open(path) as fh:
                fh.seek(size)
                text = fh.read()
            if text and text == stacks.get(rank):  # written, and no longer growing
                del asked[rank]
            stacks[rank] = text
    for rank in asked:
        if not stacks.get(rank):
            notes.append(f"rank {rank} did not answer within {wait_s:.0f} s.")
    return {rank: text for rank, text in stacks.items() if text}, notes


# Words of a device's failure in a rank's error (CUDA, NVML, the driver): the node's hardware, not the recipe.
DEVICE_ERRORS = ("uncorrectable ecc", "ecc error", "cuda error: unknown error", "unspecified launch failure",
                 "gpu is lost", "fallen off the bus", "nvml", "xid")


def culprit_nodes(states: list[dict], rank_nodes: Sequence[str], failures: Sequence[RankFailure]) -> dict[str, str]:
    """The nodes a failed job should not run on again, each with why: a rank there never reached the collective
    the others waited in, or it hit a device error. A recipe's exception on every rank, or a hang on every rank
    in the recipe's own code, names none."""
    blamed: dict[str, str] = {}
    for rank, collective in sorted(behind(states).items()):
        if rank < len(rank_nodes):
            blamed.setdefault(rank_nodes[rank], f"rank {rank} never reached {collective}")
    for failure in failures:
        first = failure.message.splitlines()[0] if failure.message else ""
        if failure.rank < len(rank_nodes) and any(words in first.lower() for words in DEVICE_ERRORS):
            blamed.setdefault(rank_nodes[failure.rank], f"rank {failure.rank} hit a device error ({first})")
    return blamed
