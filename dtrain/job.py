"""Run a rendered launcher command: the one place on the launch side that starts processes.

The launcher (torchrun) runs in its own session so that dtrain decides how a signal reaches
it: Ctrl-C or SIGTERM to dtrain becomes one SIGTERM to torchrun, which stops every rank. If
dtrain itself dies, the kernel sends torchrun SIGTERM (PR_SET_PDEATHSIG), so no rank is left
behind. Console lines carrying the rank-0 prefix are shown; torchrun's own chatter (and its
long ChildFailedError traceback) goes to `logs/launcher.log`, and dtrain prints the failing
rank's traceback once instead.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Mapping, Sequence

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RankFailure:
    rank: int
    local_rank: int
    message: str
    traceback: str
    time: float
    usage: bool  # a UsageError: one sentence, no traceback


def write_files(files: Mapping[str, str]) -> None:
    """The launcher's input files, each replaced atomically (every node of a job may write the same one)."""
    for path, text in files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def run_job(argv: Sequence[str], env: Mapping[str, str], launcher_log_path: str, preempt_signal: str = "USR2",
            rank_prefixes: bool = True) -> int:
    """Start the launcher, stream rank 0 to the console, and return the job's exit code.

    Without `rank_prefixes` (launchers other than torchrun do not tag lines with their rank),
    every line goes to the console and the launcher log.

    The preemption signal goes to the workers themselves (they checkpoint and stop together);
    torchrun ignores it, since by default it would die of it and orphan them. Under SLURM the
    workers get it straight from slurmstepd as well; a second delivery changes nothing.
    """
    preempt = getattr(signal, f"SIG{preempt_signal}")
    logs = Path(launcher_log_path).parent
    logs.mkdir(parents=True, exist_ok=True)
    with open(launcher_log_path, "a", buffering=1) as launcher_log:
        proc = subprocess.Popen(
            list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1, start_new_session=True, preexec_fn=lambda: _prepare_launcher(preempt),
        )
        received: list[int] = []

        def forward(signum, _frame):
            if not received:
                print(f"dtrain: got {signal.Signals(signum).name}, stopping every rank ...", file=sys.stderr)
            received.append(signum)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        def forward_preemption(signum, _frame):
            print(f"dtrain: got {signal.Signals(signum).name}: every rank checkpoints and stops ...", file=sys.stderr)
            received.append(signum)
            for pid in child_pids(proc.pid):
                _signal_quietly(pid, signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        previous[preempt] = signal.signal(preempt, forward_preemption)
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, launcher_log, False, rank_prefixes),
                             daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, launcher_log, True, rank_prefixes),
                             daemon=True),
        ]
        try:
            for pump in pumps:
                pump.start()
            returncode = proc.wait()
            for pump in pumps:
                pump.join()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if received:
        return 128 + received[0]
    if returncode != 0:
        launcher_text = Path(launcher_log_path).read_text(errors="replace")
        returncode = worker_exit_code(launcher_text, returncode)
        report_failure(logs, launcher_text, returncode)
    return returncode


_WORKER_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: \d+")
_SUMMARY_FAILURE = re.compile(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)")


def killed_worker(launcher_log: str) -> tuple[int, int] | None:
    """(rank, signal) of a worker killed by a signal, from torchrun's failure summary.

    Such a worker left no error file, and its peers' errors ("connection reset") are only the
    consequence. SIGTERM does not count: torchrun sends it to the survivors when it tears down.
    """
    for rank, code in _SUMMARY_FAILURE.findall(launcher_log):
        if int(code) < 0 and -int(code) != signal.SIGTERM:
            return int(rank), -int(code)
    return None


def worker_exit_code(launcher_log: str, launcher_code: int) -> int:
    """The failed worker's own exit code (torchrun itself always exits 1), as a shell reports it:
    a worker killed by signal N gives 128 + N."""
    killed = killed_worker(launcher_log)
    if killed is not None:
        return 128 + killed[1]
    codes = [int(code) for _, code in _SUMMARY_FAILURE.findall(launcher_log)] or [
        int(code) for code in _WORKER_FAILED.findall(launcher_log)[-1:]]
    code = next((c for c in codes if c > 0), codes[0] if codes else 0)
    return 128 - code if code < 0 else code or launcher_code


def _prepare_launcher(preempt: signal.Signals) -> None:
    """In the launcher's process, before exec: die with dtrain, and ignore the preemption signal.

    The ignore is inherited by the workers until the runtime installs its handler.
    """
    signal.signal(preempt, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def child_pids(parent: int, proc: Path = Path("/proc")) -> list[int]:
    """Processes whose parent is `parent` (torchrun's workers, each in a session of its own)."""
    children = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append(int(entry.name))
    return children


def _signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


_RANK_PREFIX = re.compile(r"^(\[rank(\d+)\]: )+")


def _pump(source: IO[str], console: IO[str], launcher_log: IO[str], stderr: bool, rank_prefixes: bool) -> None:
    for line in source:
        shown = console_text(line, stderr) if rank_prefixes else line
        if shown is None or not rank_prefixes:
            launcher_log.write(line)
        if shown:
            console.write(shown)
            console.flush()


def console_text(line: str, stderr: bool) -> str | None:
    """What the console shows of a line from torchrun: all of rank 0's, bare; only the warnings
    and errors (stderr) of other ranks, with one prefix; "" for their stdout (it stays in their
    log files); None for torchrun's own lines (they go to the launcher log). Recent torch
    prefixes both the log file and the tee, so a line may carry the prefix twice."""
    match = _RANK_PREFIX.match(line)
    if match is None:
        return None
    rank = match.group(2)
    body = line[match.end():]
    if rank == "0":
        return body
    return f"[rank{rank}]: {body}" if stderr else ""


def report_failure(logs: Path, launcher_log: str, returncode: int) -> None:
    """Tell the user which rank failed first; its traceback is on the console already (stderr)."""
    killed = killed_worker(launcher_log)
    if killed is not None:
        print(f"dtrain: rank {killed[0]} was killed by {signal.Signals(killed[1]).name}; the job stopped with "
              f"exit code {returncode}. Per-rank logs: {logs}.", file=sys.stderr)
        return
    failure = first_failure(logs)
    if failure is None:
        print(
            f"dtrain: the job failed with exit code {returncode}; "
            f"see {logs}/launcher.log and the per-rank logs under {logs}.",
            file=sys.stderr,
        )
        return
    if failure.usage:  # its one sentence is on the console already
        return
    print(
        f"dtrain: rank {failure.rank} failed first ({failure.message}); the job stopped with exit code "
        f"{returncode}. Per-rank logs: {logs}.",
        file=sys.stderr,
    )


def first_failure(logs: Path) -> RankFailure | None:
    """The earliest error recorded by a worker in the newest attempt, from its error.json."""
    attempts = sorted(logs.glob("*/attempt_*"), key=lambda p: p.stat().st_mtime)
    if not attempts:
        return None
    failures = [f for f in map(read_error_file, attempts[-1].glob("*/error.json")) if f is not None]
    return min(failures, key=lambda f: f.time, default=None)


def read_error_file(path: Path) -> RankFailure | None:
    """Parse an error file written by `dtrain.runtime.dist` (torchelastic's format plus a 'dtrain' key)."""
    try:
        data = json.loads(path.read_text())
        info = data["dtrain"]
        return RankFailure(
            rank=int(info["rank"]),
            local_rank=int(path.parent.name),
            message=str(data["message"]["message"]),
            traceback=str(data["message"]["extraInfo"]["py_callstack"]),
            time=float(info["time"]),
            usage=bool(info.get("usage")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
