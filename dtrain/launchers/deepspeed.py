"""LaunchSpec -> `deepspeed` launcher argv, environment, and the hostfile it reads.

Every node runs its own launcher (as `dtrain launch` does under SLURM): `--no_ssh` with this
node's `--node_rank`, so DeepSpeed never reaches for pdsh or ssh. The hostfile only tells it
the shape of the job (nodes x processes); its host names are placeholders. `--no_local_rank`:
recipes read LOCAL_RANK from the environment and keep their own command line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

from dtrain.config import LaunchSpec, worker_env


def hostfile_path(spec: LaunchSpec) -> str:
    return str(Path(spec.run_dir) / "hostfile")


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
