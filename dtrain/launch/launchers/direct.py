"""No launcher: a job of one process on one node, without restarts, is the worker itself.

torchrun's agent costs a second or two of start-up (an interpreter that imports torch, a rendezvous)
and, for a world of one that is never restarted, does nothing in return. `dtrain launch` runs the
recipe as its child instead, with the environment torchrun would give rank 0, and keeps what the
agent would have kept: the rank's stdout and stderr in `logs/<name>_direct/attempt_0/0/`, the same
console, exit codes, Ctrl-C (one SIGTERM to the worker) and failure records.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from dtrain.core.contract import worker_env
from dtrain.core.launchers import DIRECT
from dtrain.core.rundir import RunDir
from dtrain.core.spec import LaunchSpec
from dtrain.launch.launchers import ExitStatus

RANK_ZERO = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0"}


def files(spec: LaunchSpec) -> dict[str, str]:
    return {}


def rank_logs(spec: LaunchSpec) -> tuple[str, str]:
    """Where the worker's stdout and stderr are kept: torchrun's layout, as a world of one's."""
    folder = spec.paths.attempt_logs(spec.name, DIRECT)
    return str(RunDir.rank_log(folder, 0, "stdout")), str(RunDir.rank_log(folder, 0, "stderr"))


def build_command(spec: LaunchSpec, cpus: int, base_env: Mapping[str, str],
                  python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    return [python, spec.recipe, *spec.recipe_args], {**worker_env(spec, cpus, base_env), **RANK_ZERO}


def exit_status(launcher_log: str, launcher_code: int) -> ExitStatus:
    """The worker's own exit code; -N: it was killed by signal N."""
    if launcher_code < 0:
        return ExitStatus(128 - launcher_code, signal=-launcher_code, rank=0)
    return ExitStatus(launcher_code)
