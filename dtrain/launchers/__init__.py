"""The launchers: real programs that start a job's processes, in one registry.

A launcher module renders a LaunchSpec into the launcher's argv and environment
(`build_command`), lists the files the launcher reads (`files`, written into the run directory
before it starts), and reads the launcher's account of a failure (`exit_status`). It runs
nothing: `dtrain.job` does. A new launcher is its module plus one row here.
"""

from __future__ import annotations

import dataclasses
import importlib
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from dtrain.errors import UsageError

if TYPE_CHECKING:
    from dtrain.spec import LaunchSpec


@dataclasses.dataclass(frozen=True)
class Launcher:
    name: str
    module: str  # the module that renders it
    package: str | None  # what must be installed to use it
    rank_prefixes: bool  # each worker's line reaches dtrain tagged with its rank ("[rank3]: ...")
    restarts: bool  # can restart the workers (--max-restarts)
    one_node: bool = False  # starts the processes of one node only
    agent: bool = True  # a process of its own starts the workers; without one, the worker is dtrain's child

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)


LAUNCHERS = {launcher.name: launcher for launcher in (
    Launcher("torchrun", "dtrain.launchers.torchrun", package=None, rank_prefixes=True, restarts=True),
    Launcher("accelerate", "dtrain.launchers.accelerate", package="accelerate", rank_prefixes=True, restarts=True),
    Launcher("deepspeed", "dtrain.launchers.deepspeed", package="deepspeed", rank_prefixes=False, restarts=False),
    Launcher("local", "dtrain.launchers.local", package=None, rank_prefixes=True, restarts=False, one_node=True),
    Launcher("direct", "dtrain.launchers.direct", package=None, rank_prefixes=False, restarts=False, one_node=True,
             agent=False),
)}
# What a job on one node without restarts uses unless --launcher says otherwise: no launcher for one process,
# dtrain's own agent for more; torchrun otherwise.
DIRECT, LOCAL, TORCHRUN = "direct", "local", "torchrun"


@dataclasses.dataclass(frozen=True)
class ExitStatus:
    """A failed job as its launcher tells it."""

    code: int  # the failed worker's exit code, as a shell reports it: 128 + N when killed by signal N
    signal: int | None = None  # a worker was killed by this signal (it left no error record) ...
    rank: int | None = None  # ... and this was its rank, when the launcher says
    rendezvous_timeout: bool = False  # the nodes never met: no worker started


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


def attempt_logs(spec: LaunchSpec, launcher: str) -> Path:
    """Where a launcher of dtrain's own (direct, local) keeps each rank's stdout and stderr: torchrun's layout,
    `<rank>/{stdout,stderr}.log` under this folder, so every launch's run directory reads alike."""
    return Path(spec.log_dir) / f"{spec.name}_{launcher}" / "attempt_0"


def get(name: str) -> Launcher:
    try:
        return LAUNCHERS[name]
    except KeyError:
        raise UsageError(f"unknown launcher {name!r}; use one of {', '.join(LAUNCHERS)}.") from None


def build(spec: LaunchSpec, cpus: int, base_env: Mapping[str, str],
          python: str = sys.executable) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(argv, env, files) for the spec's launcher; files maps a path to its text."""
    from dtrain.spec import launch_files

    module = get(spec.launcher).implementation()
    argv, env = module.build_command(spec, cpus, base_env, python)
    return argv, env, {**launch_files(spec), **module.files(spec)}
