"""Run a rendered launcher command: the one place on the launch side that starts processes.

The launcher runs in its own session so that dtrain decides how a signal reaches it: Ctrl-C or
SIGTERM to dtrain becomes one SIGTERM to the launcher, which stops every rank. If dtrain itself
dies, the kernel sends the launcher SIGTERM (PR_SET_PDEATHSIG), so no rank is left behind. Of
launchers that tag lines with their rank, the console shows rank 0's lines and the other ranks'
errors; the launcher's own chatter (and its long traceback) goes to `logs/launcher.log`, and
dtrain names the rank that failed first instead. The supervisor never dies of its own I/O: when
the run directory's disk is full it says so once and goes on, and the workers' error records
reach it through a spool of this node's, off that disk.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import yaml

from dtrain import engines
from dtrain.core import hardware, launchers
from dtrain.core.contract import ERROR_SPOOL, Job, RankFailure, failures, first_failure
from dtrain.core.hangs import culprit_nodes, hang_report, read_states, timed_out
from dtrain.core.rundir import RunDir, write_atomically, write_json_atomically
from dtrain.core.spec import LaunchSpec
from dtrain.engines import Submitter
from dtrain.errors import UsageError
from dtrain.launch.launchers import ExitStatus

_PR_SET_PDEATHSIG = 1


def write_files(files: Mapping[str, str]) -> None:
    """The launcher's input files, each replaced atomically (every node of a job may write the same one)."""
    for path, text in files.items():
        try:
            write_atomically(path, text)
        except OSError as exc:
            raise UsageError(f"cannot write {path} ({exc.strerror or exc}); free space in the run directory or "
                             "pass another --run-dir.") from None


def record_end(run_dir: str, code: int | None) -> None:
    """`ended.json` in the run directory: how its last `dtrain launch` ended (None: it has started). A sweep
    reads it to skip finished runs; losing it to a full disk only means the run is launched again."""
    path = RunDir.of(run_dir).ended
    try:
        if code is None:
            path.unlink(missing_ok=True)
        else:
            write_json_atomically(path, {"exit_code": code, "time": round(time.time(), 3)})
    except OSError:
        pass


def ended(run_dir: str | os.PathLike) -> dict | None:
    """How the run's last `dtrain launch` ended (`record_end`), or None while it runs or before it ever did."""
    try:
        return json.loads(RunDir.of(run_dir).ended.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_dir_lock(spec: LaunchSpec) -> Iterator[None]:
    """Hold this node's lock of the run directory (`spec.launch_lock`) while the job runs: a second `dtrain launch`
    (or `dtrain debug`) of the same run on the same node would write the same checkpoints and metrics, so it is
    refused before it touches anything. An flock, released when this process ends however it ends; the file
    says who holds it. A file system without locks (ENOLCK) runs unguarded. After `probe_run_dir`."""
    with open(spec.launch_lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UsageError(f"{spec.run_dir} is in use by another dtrain launch of this run ({holder}); wait for it "
                             "to end or stop it, or pass another --name.") from None
        except OSError:
            pass
        with contextlib.suppress(OSError):
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
        yield


def probe_run_dir(run_dir: str) -> None:
    """Refuse a run directory that cannot be written before any process starts: write, sync and remove a
    file there (a read-only mount stops root too, which permission bits do not)."""
    probe = RunDir.of(run_dir).probe(os.getpid())
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as fh:
            fh.write("probe")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"run directory {run_dir} cannot be written ({exc.strerror or exc}); pass another --run-dir "
                         "(or --name), or make it writable.") from None


class LauncherLog:
    """The launcher's own lines: appended to `logs/launcher.log` while its disk allows (said once when it
    stops allowing), and the last of them kept in memory, where its account of a failure is read from.
    Without a launcher (`direct`), the worker's stdout and stderr, each to its rank log."""

    KEPT = 4000

    def __init__(self, path: str):
        self.path = path
        self.tail: collections.deque[str] = collections.deque(maxlen=self.KEPT)
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)
        except OSError as exc:
            self._give_up(exc)

    def write(self, line: str) -> None:
        with self._lock:
            self.tail.append(line)
            if self._file is not None:
                try:
                    self._file.write(line)
                except OSError as exc:
                    self._give_up(exc)

    def text(self) -> str:
        with self._lock:
            return "".join(self.tail)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _give_up(self, exc: OSError) -> None:
        self._close()
        print(f"dtrain: cannot write {self.path} ({exc.strerror or exc}); going on without it.", file=sys.stderr,
              flush=True)

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


def run_job(spec: LaunchSpec, argv: Sequence[str], env: Mapping[str, str], started: float) -> int:
    """Start the launcher, show the workers' output, and return the job's exit code.

    The preemption signal goes to the workers themselves (they checkpoint and stop together); the
    launcher ignores it, since by default it would die of it and orphan them. Under SLURM the
    workers get it straight from slurmstepd as well; a second delivery changes nothing.
    """
    launcher = launchers.get(spec.launcher)
    preempt = getattr(signal, f"SIG{spec.preempt_signal}")
    stop = signal.SIGINT if preempt == signal.SIGTERM else signal.SIGTERM  # the launcher ignores the preemption signal
    spool = _error_spool()
    if spool:
        env = {**env, ERROR_SPOOL: spool}
    launcher_log = LauncherLog(spec.launcher_log)
    stream_logs = ([LauncherLog(path) for path in launcher.implementation().rank_logs(spec)] if not launcher.agent
                   else [launcher_log, launcher_log])
    if spec.nodes > 1:
        _announce_node(spec)
    try:
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
                proc.send_signal(stop)

        def forward_preemption(signum, _frame):
            print(f"dtrain: got {signal.Signals(signum).name}: every rank checkpoints and stops ...", file=sys.stderr)
            received.append(signum)
            for pid in child_pids(proc.pid) if launcher.agent else [proc.pid]:
                _signal_quietly(pid, signum)

        lost = threading.Event()  # the rendezvous host stopped answering after a rank failed: this node gave up
        if spec.nodes > 1 and spec.node_rank != 0 and spool:
            threading.Thread(target=_watch_rendezvous_host, args=(spec, spool, started, proc, lost), daemon=True).start()
        handlers = {**dict.fromkeys((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), forward), preempt: forward_preemption}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}  # SIGTERM may preempt
        pumps = [threading.Thread(target=_pump, args=(stream, console, log, is_stderr, launcher.rank_prefixes),
                                  daemon=True)
                 for stream, console, log, is_stderr in ((proc.stdout, sys.stdout, stream_logs[0], False),
                                                         (proc.stderr, sys.stderr, stream_logs[1], True))]
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
        if lost.is_set():
            print(f"dtrain: {host_lost(spec, 'it stopped answering on the network while this node waited for it')}",
                  file=sys.stderr)
            return 1
        if returncode == 0:
            return 0
        status = launcher.implementation().exit_status(launcher_log.text(), returncode)
        if status.store_lost and spec.node_rank != 0:
            print(f"dtrain: {host_lost(spec, 'its rendezvous store went away')}", file=sys.stderr)
            return status.code
        if status.rendezvous_timeout:
            print(f"dtrain: {rendezvous_failure(spec, arrived_nodes(spec, started))}", file=sys.stderr)
            return status.code
        failures = [first_failure(folder, spec.world_size, started) for folder in (spool, spec.run_dir) if folder]
        failure = next((f for f in failures if f is not None), None)
        if failure is None or failure.usage or not timed_out(failure.message):
            report_failure(status, failure, spec.log_dir)  # a rank killed outright (as NCCL's watchdog does) may hang
            return status.code
        for line in _hang_verdict(spec, started):  # the culprit first: the rank that waited is not it
            print(line, file=sys.stderr)
        report_failure(status, failure, spec.log_dir)
        return status.code
    finally:
        for log in {launcher_log, *stream_logs}:
            log.close()
        if spool:
            shutil.rmtree(spool, ignore_errors=True)


def host_lost(spec: LaunchSpec, how: str) -> str:
    return (f"node {spec.node_rank} lost the rendezvous host {spec.master_addr} (node 0): {how}, so this node stopped "
            "its ranks; the job goes on only with node 0 back"
            + (" (a shrink, --min-nodes, needs node 0 alive: it holds the rendezvous)." if spec.min_nodes else "."))


LOST_HOST_CHECKS = (0.0, 5.0)  # seconds after a rank's failure when the rendezvous host is asked: a blip is no loss
KILL_GRACE_S = 5.0


def _watch_rendezvous_host(spec: LaunchSpec, spool: str, started: float, proc: subprocess.Popen,
                           lost: threading.Event) -> None:
    """On a node other than 0: once one of its ranks has failed, if node 0 (which holds the rendezvous store) does
    not answer on the network, stop the launcher and its workers. A launcher's agent would wait for the store for
    many minutes (torchrun's does), and outside a cluster's scheduler nothing else would ever end this node."""
    since = started
    while proc.poll() is None:
        if first_failure(spool, spec.world_size, since) is not None:
            since = time.time()  # a failure with the host there (a restart, a shrink) is the launcher's to handle
            if _host_gone(spec.master_addr, proc):
                lost.set()
                stop_tree(proc.pid, KILL_GRACE_S)
                return
        time.sleep(1.0)


def _host_gone(address: str, proc: subprocess.Popen) -> bool:
    """Whether `address` does not answer at any of LOST_HOST_CHECKS while the launcher still runs."""
    for delay in LOST_HOST_CHECKS:
        time.sleep(delay)
        if proc.poll() is not None or hardware.answers(address):
            return False
    return True


def stop_tree(pid: int, grace: float) -> None:
    """SIGTERM to a process and every process below it (each worker in a session of its own), then SIGKILL to what
    is left after `grace` seconds."""
    tree = [pid, *descendants(pid)]
    for member in tree:
        _signal_quietly(member, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_exists(member) for member in tree):
        time.sleep(0.2)
    for member in tree:
        _signal_quietly(member, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = [child for parent in frontier for child in child_pids(parent)]
        found += children
        frontier = children
    return found


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def run_across_nodes(spec: LaunchSpec, argv: Sequence[str], engine: Submitter, job: Job, started: float) -> int:
    """The job's own launch, started once for all its nodes (a batch script's): run the engine's command that starts
    `dtrain launch` on every node, and when the job fails for a cause that belongs to a node (a rank there hung, or
    hit a device error, or the node dropped off the network), requeue it without that node, at most --max-requeues
    times. A recipe's exception on every rank, or its hang on every rank, requeues nothing: it would fail again.
    With --preflight, a node the preflight finds slow is such a cause before training starts."""
    if spec.preflight:
        slow = preflight_slow_nodes(spec)
        if slow and _requeue_without(spec, engine, job, slow):
            return 1
        if slow:
            print("dtrain: the job trains on the nodes it has, slow or not.", file=sys.stderr, flush=True)
    proc = subprocess.Popen(list(argv))

    def forward(signum, _frame):
        _signal_quietly(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait() if spec.min_nodes is None else _until_node_0_ends(proc, spec.run_dir, started)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        return 0
    last = ended(spec.run_dir) or {}
    if spec.min_nodes is not None and last.get("exit_code") == 0 and last.get("time", 0) >= started:
        print(f"dtrain: the job lost a node on the way and finished on the others (--min-nodes {spec.min_nodes}).",
              file=sys.stderr)
        return 0  # node 0's launch ended well: the job's result, whatever srun says of the lost node's task
    blamed = culprit_nodes(read_states(spec.run_dir, started), _rank_nodes(spec),
                           failures(spec.run_dir, spec.world_size, started))
    for record in node_records(spec, started).values():
        if record.get("address") and record.get("node_name") and not hardware.answers(record["address"]):
            blamed.setdefault(record["node_name"], "it did not answer on the network")
    if blamed:
        _requeue_without(spec, engine, job, blamed)
    return code


def preflight_slow_nodes(spec: LaunchSpec) -> dict[str, str]:
    """--preflight: dtrain doctor's preflight on every node of the job (its result kept as the run's
    preflight.json, its lines printed), and the nodes of the ranks it found slow -> why."""
    from dtrain.launch.doctor import node_of_rank, preflight_lines, run_preflight

    devices = ["--cpu", "--nproc", str(spec.nproc)] if spec.device == "cpu" else ["--gpus", str(spec.nproc)]
    try:
        result = run_preflight(devices, str(Path(spec.run_dir).parent))
    except UsageError as exc:
        print(f"dtrain: {exc}", file=sys.stderr)
        return {}
    write_json_atomically(spec.paths.preflight, result)
    lines, slow = preflight_lines(result)
    print("\n".join(lines), file=sys.stderr, flush=True)
    node_of = {r["rank"]: node_of_rank(r) for r in result["ranks"]}
    return {node_of[rank]: f"the preflight's matmul took {ratio:.1f}x the other ranks' median there"
            for rank, ratio in slow}


def _requeue_without(spec: LaunchSpec, engine: Submitter, job: Job, blamed: Mapping[str, str]) -> bool:
    """Name the nodes to blame and put the job back in the queue without them, if --max-requeues and the nodes left
    allow; whether it did (the engine stops this process meanwhile: SLURM does)."""
    for node, why in blamed.items():
        print(f"dtrain: node {node}: {why}.", file=sys.stderr)
    if job.requeue_count >= spec.max_requeues:
        print(f"dtrain: {engine.name} job {job.job_id} is not requeued without {', '.join(blamed)}: it was requeued "
              f"{job.requeue_count} time(s), --max-requeues {spec.max_requeues}.", file=sys.stderr)
        return False

    def announce(excluded: list[str]) -> None:
        print(f"dtrain: requeueing {engine.name} job {job.job_id} without node {', '.join(excluded)} (requeue "
              f"{job.requeue_count + 1} of {spec.max_requeues}); it resumes from its newest checkpoint.",
              file=sys.stderr, flush=True)

    try:
        engine.requeue_without(job.job_id, sorted(blamed), spec.nodes, announce)
    except UsageError as exc:
        print(f"dtrain: {exc}", file=sys.stderr)
        return False
    return True


STEP_GRACE_S = 30  # after node 0's launch ended, how long the engine's step may take to end by itself


def _until_node_0_ends(proc: subprocess.Popen, run_dir: str, started: float) -> int:
    """The fan-out's exit code, in a job that may shrink: there node 0's launch ending is the job's end, and a step
    that still waits on a lost node's task (srun can) is stopped STEP_GRACE_S later (SIGTERM, SIGKILL 30 s on)."""
    while True:
        try:
            return proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            last = ended(run_dir) or {}
            if last.get("time", 0) >= started and time.time() - last["time"] > STEP_GRACE_S:
                print(f"dtrain: node 0's launch ended {STEP_GRACE_S} s ago and the step that ran it on every node has "
                      "not; stopping it.", file=sys.stderr, flush=True)
                _signal_quietly(proc.pid, signal.SIGTERM)
                try:
                    return proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _signal_quietly(proc.pid, signal.SIGKILL)
                    return proc.wait()


def _rank_nodes(spec: LaunchSpec) -> list[str]:
    """Each rank's node (the engine's name for it), as the job's rank 0 recorded in config.yaml."""
    try:
        return list(yaml.safe_load(spec.paths.config.read_text()).get("rank_nodes") or [])
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def _hang_verdict(spec: LaunchSpec, started: float) -> list[str]:
    """After a collective timed out: the nodes that no longer answer on the network, then the hang report."""
    silent = silent_nodes(spec, started, hardware.answers) if spec.nodes > 1 else []
    dropped = ([f"dtrain: {', '.join(f'node {n} ({a})' for n, a in silent)} did not answer on the network when the "
                "collective timed out: it dropped off, and the others waited for it."] if silent else [])
    return dropped + hang_report(read_states(spec.run_dir, started), spec.run_dir)


def _announce_node(spec: LaunchSpec) -> None:
    """Say in the (shared) run directory that this node has come, so that a rendezvous that times out
    can say which nodes did (a node whose disk refuses is only missing from that message)."""
    job = engines.job(os.environ)
    record = {"node_rank": spec.node_rank, "host": os.uname().nodename, "time": time.time(),
              "address": (spec.network or {}).get("address"), "node_name": job.node_name if job else None}
    write_json_atomically(spec.paths.node_record(spec.node_rank), record)


def node_records(spec: LaunchSpec, started: float) -> dict[int, dict]:
    """What the nodes of this launch announced when they came (`_announce_node`), by node rank, as far
    as the run directory shows (every node on a shared file system; this one alone on a node's own disk)."""
    records = {}
    for node_rank in range(spec.nodes):
        try:
            record = json.loads(spec.paths.node_record(node_rank).read_text())
            if record["time"] >= started - spec.rdzv_timeout:
                records[node_rank] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def arrived_nodes(spec: LaunchSpec, started: float) -> list[int]:
    """The node ranks that came to this launch's rendezvous."""
    return sorted({spec.node_rank, *node_records(spec, started)})


def silent_nodes(spec: LaunchSpec, started: float, answers) -> list[tuple[int, str]]:
    """(node rank, address) of the other nodes of this launch that do not answer on the network
    (`answers(address)`, e.g. `hardware.answers`), from the addresses they announced."""
    return [(node_rank, record["address"]) for node_rank, record in node_records(spec, started).items()
            if node_rank != spec.node_rank and record.get("address") and not answers(record["address"])]


def rendezvous_failure(spec: LaunchSpec, arrived: list[int]) -> str:
    missing = [n for n in range(spec.nodes) if n not in arrived]
    return (f"the rendezvous at {spec.master_addr}:{spec.master_port} timed out after {spec.rdzv_timeout} s: "
            f"{len(arrived)} of {spec.nodes} nodes came (node {', '.join(map(str, arrived))}), node "
            f"{', '.join(map(str, missing)) or '?'} did not; start `dtrain launch` on every node with the same --name, "
            f"--nodes, --master-addr and --master-port, or give them more time with --rdzv-timeout.")


def _error_spool() -> str | None:
    """A folder of this node's, in memory where it can be, for the workers' error records: the run
    directory's disk may be the full one."""
    try:
        return tempfile.mkdtemp(prefix="dtrain-errors-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    except OSError:
        return None


def _prepare_launcher(preempt: signal.Signals) -> None:
    """In the launcher's process, before exec: die with dtrain, and ignore the preemption signal.

    The ignore is inherited by the workers until the runtime installs its handler.
    """
    signal.signal(preempt, signal.SIG_IGN)
    die_with_parent()


def die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM when the process that started it dies, so that none is orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def child_pids(parent: int, proc: Path = Path("/proc")) -> list[int]:
    """Processes whose parent is `parent` (the launcher's workers, each in a session of its own)."""
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


def _pump(source: IO[str], console: IO[str], launcher_log: LauncherLog, stderr: bool, rank_prefixes: bool) -> None:
    for line in source:
        shown = console_text(line, stderr) if rank_prefixes else line
        if shown is None or not rank_prefixes:
            launcher_log.write(line)
        if shown:
            console.write(shown)
            console.flush()


def console_text(line: str, stderr: bool) -> str | None:
    """What the console shows of a line from a launcher that tags lines with their rank: all of rank
    0's, bare; only the warnings and errors (stderr) of other ranks, with one prefix; "" for their
    stdout (it stays in their log files); None for the launcher's own lines (they go to the launcher
    log). Recent torch prefixes both the log file and the tee, so a line may carry the prefix twice."""
    match = _RANK_PREFIX.match(line)
    if match is None:
        return None
    rank = match.group(2)
    body = line[match.end():]
    if rank == "0":
        return body
    return f"[rank{rank}]: {body}" if stderr else ""


def report_failure(status: ExitStatus, failure: RankFailure | None, logs: str) -> None:
    """Name the rank that failed first; its traceback is on the console already (stderr)."""
    if status.signal is not None:
        who = f"rank {status.rank}" if status.rank is not None else "a worker"
        print(f"dtrain: {who} was killed by {signal.Signals(status.signal).name}; the job stopped with exit code "
              f"{status.code}. Per-rank logs: {logs}.", file=sys.stderr)
    elif failure is None:
        print(f"dtrain: the job failed with exit code {status.code}; see {logs}/launcher.log and the per-rank logs "
              f"under {logs}.", file=sys.stderr)
    elif failure.usage:  # one sentence, shown here once, whichever ranks made it
        print(f"dtrain: error: {failure.message}", file=sys.stderr)
    elif timed_out(failure.message):
        print(f"dtrain: rank {failure.rank} was the first to wait out --timeout ({failure.message.splitlines()[0]}); "
              f"the job stopped with exit code {status.code}. Per-rank logs: {logs}.", file=sys.stderr)
    else:
        print(f"dtrain: rank {failure.rank} failed first ({failure.message}); the job stopped with exit code "
              f"{status.code}. Per-rank logs: {logs}.", file=sys.stderr)
