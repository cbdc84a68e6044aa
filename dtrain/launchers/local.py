"""dtrain's own agent (`python -m dtrain.agent`): the default for many processes on one node without restarts.

It starts the workers as torchrun would, without importing torch first (2-3 s sooner on a small machine);
see `dtrain/agent.py`.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Mapping

from dtrain.agent import failures
from dtrain.contract import worker_env
from dtrain.launchers import ExitStatus
from dtrain.spec import LaunchSpec


def files(spec: LaunchSpec) -> dict[str, str]:
    return {}


def build_command(spec: LaunchSpec, cpus: int, base_env: Mapping[str, str],
                  python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    argv = [python, "-m", "dtrain.agent", "--nproc", str(spec.nproc), "--master-addr", spec.master_addr,
            "--master-port", str(spec.master_port), "--log-dir", spec.log_dir, "--run-id", spec.name,
            spec.recipe, *spec.recipe_args]
    return argv, worker_env(spec, cpus, base_env)


def exit_status(launcher_log: str, launcher_code: int) -> ExitStatus:
    """The failed worker's exit code from the agent's summary; one killed by a signal other than the SIGTERM
    that stops the others is the cause (it left no error record)."""
    failed = failures(launcher_log)
    for rank, code in failed:
        if code < 0 and -code != signal.SIGTERM:
            return ExitStatus(128 - code, signal=-code, rank=rank)
    if not failed:
        return ExitStatus(launcher_code)
    code = failed[0][1]
    return ExitStatus(128 - code if code < 0 else code)
