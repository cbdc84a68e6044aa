"""dtrain's own agent (`python -m dtrain.launch.agent`): the workers of one node, without restarts, without torch.

torchrun's agent imports torch before it starts a worker (2-3 s of one core on a small machine) and
exits after them; on one node without restarts its rendezvous and its elastic machinery do nothing in
return. This agent starts the same workers with the environment torchrun gives them (rank 0 hosts the
store at MASTER_ADDR:MASTER_PORT), tags their lines as torchrun does (`[rankN]: `), keeps each rank's
stdout and stderr in torchrun's layout (`<log-dir>/<rank>/`, `RunDir.attempt_logs`), and when a worker
fails, stops the others (SIGTERM, then SIGKILL after a grace period) and prints one summary line per
failed worker, which `dtrain.launch.launchers.local.exit_status` reads. SIGTERM, SIGINT or SIGHUP to the agent
stops every worker the same way. The preemption signal is not its business: `dtrain launch` sends it
to the workers, and the agent inherits its being ignored.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from dtrain.core.rundir import RunDir
from dtrain.launch.job import LauncherLog, die_with_parent

GRACE_S = 30  # what a worker has to end after SIGTERM, as torchrun gives it
FAILED = "dtrain agent: rank {rank} failed (exitcode: {code})"
_FAILED = re.compile(r"^dtrain agent: rank (\d+) failed \(exitcode: (-?\d+)\)$", re.MULTILINE)


def failures(agent_log: str) -> list[tuple[int, int]]:
    """(rank, exit code) of each worker that failed, as the agent's lines say (-N: killed by signal N)."""
    return [(int(rank), int(code)) for rank, code in _FAILED.findall(agent_log)]


def rank_env(rank: int, nproc: int, master_addr: str, master_port: int) -> dict[str, str]:
    """What torchrun gives each worker of a one-node job about its place in it."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(nproc),
            "ROLE_NAME": "default", "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def _tee(source: IO[str], log: LauncherLog, out: IO[str], prefix: str, lock: threading.Lock) -> None:
    """Each line to the rank's log file (while its disk allows) and, tagged, to the agent's stream."""
    for line in source:
        log.write(line)
        with lock:
            out.write(prefix + line)
            out.flush()
    log.close()


def run(nproc: int, master_addr: str, master_port: int, log_dir: str, argv: list[str]) -> int:
    workers: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    locks = {sys.stdout: threading.Lock(), sys.stderr: threading.Lock()}
    stopping: list[int] = []

    def stop(signum, _frame):
        stopping.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    for rank in range(nproc):
        env = {**os.environ, **rank_env(rank, nproc, master_addr, master_port)}
        worker = subprocess.Popen([sys.executable, "-u", *argv], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True,
                                  preexec_fn=die_with_parent)
        workers.append(worker)
        for source, name, out in ((worker.stdout, "stdout", sys.stdout), (worker.stderr, "stderr", sys.stderr)):
            log = LauncherLog(str(RunDir.rank_log(Path(log_dir), rank, name)))
            pump = threading.Thread(target=_tee, args=(source, log, out, f"[rank{rank}]: ", locks[out]), daemon=True)
            pump.start()
            pumps.append(pump)

    failed: list[tuple[int, int]] = []
    while not stopping:
        codes = [worker.poll() for worker in workers]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed or None not in codes:
            break
        time.sleep(0.05)
    if failed or stopping:
        _stop(workers)
    for pump in pumps:
        pump.join()
    for rank, code in failed:
        print(FAILED.format(rank=rank, code=code), file=sys.stderr, flush=True)
    if stopping:
        return 128 + stopping[0]
    return 1 if failed else 0


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dtrain.launch.agent", description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--master-addr", required=True)
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--log-dir", required=True, help="each rank's stdout.log and stderr.log go in <log-dir>/<rank>/")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="the recipe and its arguments")
    args = parser.parse_args()
    sys.exit(run(args.nproc, args.master_addr, args.master_port, args.log_dir, args.argv))


if __name__ == "__main__":
    main()
