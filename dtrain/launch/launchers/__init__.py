"""The launcher modules, one per row of `dtrain.core.launchers`, and what they share.

A launcher module renders a LaunchSpec into the launcher's argv and environment
(`build_command`), lists the files the launcher reads (`files`, written into the run directory
before it starts), and reads the launcher's account of a failure (`exit_status`). It runs
nothing: `dtrain.launch.job` does.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Mapping, Sequence

from dtrain.core import launchers
from dtrain.core.spec import LaunchSpec, launch_files


@dataclasses.dataclass(frozen=True)
class ExitStatus:
    """A failed job as its launcher tells it."""

    code: int  # the failed worker's exit code, as a shell reports it: 128 + N when killed by signal N
    signal: int | None = None  # a worker was killed by this signal (it left no error record) ...
    rank: int | None = None  # ... and this was its rank, when the launcher says
    rendezvous_timeout: bool = False  # the nodes never met: no worker started
    store_lost: bool = False  # the rendezvous store (on node 0) went away under this node's agent


def worker_failure(failed: Sequence[tuple[int, int]], launcher_code: int) -> ExitStatus:
    """The job's exit status from its launcher's account of each failed worker (rank, exit code; -N: killed by
    signal N). A worker killed by a signal left no error record, and its peers' errors ("connection reset") are only
    the consequence: it is the cause. SIGTERM does not count: the launcher sends it to the survivors when it tears
    down. Otherwise the first worker's own code."""
    for rank, code in failed:
        if code < 0 and -code != signal.SIGTERM:
            return ExitStatus(128 - code, signal=-code, rank=rank)
    code = next((c for _, c in failed if c > 0), failed[0][1] if failed else 0)
    return ExitStatus(128 - code if code < 0 else code or launcher_code)



def build(spec: LaunchSpec, cpus: int, base_env: Mapping[str, str],
          python: str = sys.executable) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(argv, env, files) for the spec's launcher; files maps a path to its text."""
    module = launchers.get(spec.launcher).implementation()
    argv, env = module.build_command(spec, cpus, base_env, python)
    return argv, env, {**launch_files(spec), **module.files(spec)}
