"""The `deepspeed` launcher: argv, environment, the hostfile it reads, and its one line on a failure.

Every node runs its own launcher (as `dtrain launch` does under SLURM): `--no_ssh` with this
node's `--node_rank`, so DeepSpeed never reaches for pdsh or ssh. The hostfile only tells it
the shape of the job (nodes x processes); its host names are placeholders. `--no_local_rank`:
recipes read LOCAL_RANK from the environment and keep their own command line. It has no
rendezvous (every node dials MASTER_ADDR:MASTER_PORT) and no restarts; its workers' lines carry no
rank, so the console shows all of them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping

from dtrain.core.contract import worker_env
from dtrain.core.spec import LaunchSpec
from dtrain.launch.launchers import ExitStatus


def hostfile_path(spec: LaunchSpec) -> str:
    return str(spec.paths.hostfile)


def hostfile(spec: LaunchSpec) -> str:
    return "".join(f"node{i} slots={spec.nproc}\n" for i in range(spec.nodes))


def files(spec: LaunchSpec) -> dict[str, str]:
    return {hostfile_path(spec): hostfile(spec)}


def build_command(spec: LaunchSpec, cpus: int, base_env: Mapping[str, str],
                  python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    argv = [python, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile_path(spec), "--no_ssh",
            "--node_rank", str(spec.node_rank), "--master_addr", spec.master_addr,
            "--master_port", str(spec.master_port), "--no_local_rank", spec.recipe, *spec.recipe_args]
    return argv, worker_env(spec, cpus, base_env)


_RETURN_CODE = re.compile(r"exits with return code = (-?\d+)")


def exit_status(launcher_log: str, launcher_code: int) -> ExitStatus:
    """The first failed worker's exit code, from the launcher's "... exits with return code = N"
    (it names no rank; -N: killed by signal N)."""
    codes = [int(code) for code in _RETURN_CODE.findall(launcher_log)]
    if not codes:
        return ExitStatus(launcher_code)
    if codes[0] < 0:
        return ExitStatus(128 - codes[0], signal=-codes[0])
    return ExitStatus(codes[0] or launcher_code)
