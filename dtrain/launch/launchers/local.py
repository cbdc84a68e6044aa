"""dtrain's own agent (`python -m dtrain.launch.agent`): the default for many processes on one node without restarts.

It starts the workers as torchrun would, without importing torch first (2-3 s sooner on a small machine);
see `dtrain/launch/agent.py`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from dtrain.core.contract import worker_env
from dtrain.core.launchers import LOCAL
from dtrain.core.spec import LaunchSpec
from dtrain.launch.agent import failures
from dtrain.launch.launchers import ExitStatus, worker_failure


def files(spec: LaunchSpec) -> dict[str, str]:
    return {}


def build_command(spec: LaunchSpec, cpus: int, base_env: Mapping[str, str],
                  python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    argv = [python, "-m", "dtrain.launch.agent", "--nproc", str(spec.nproc), "--master-addr", spec.master_addr,
            "--master-port", str(spec.master_port), "--log-dir", str(spec.paths.attempt_logs(spec.name, LOCAL)),
            spec.recipe, *spec.recipe_args]
    return argv, worker_env(spec, cpus, base_env)


def exit_status(launcher_log: str, launcher_code: int) -> ExitStatus:
    return worker_failure(failures(launcher_log), launcher_code)
