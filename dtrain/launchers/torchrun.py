"""LaunchSpec -> `python -m torch.distributed.run` argv and environment."""

from __future__ import annotations

import sys
from typing import Mapping

from dtrain.config import LaunchSpec, worker_env

# Global rank in front of every line torchrun copies to the console or a log file. Given through the
# environment, which torchrun 2.11 and 2.14 both read: 2.11 has no --log-line-prefix-template flag.
LINE_PREFIX_TEMPLATE = "[rank${rank}]: "


def files(spec: LaunchSpec) -> dict[str, str]:
    """torchrun reads no file of dtrain's."""
    return {}


def build_command(
    spec: LaunchSpec, cpus: int, base_env: Mapping[str, str], python: str = sys.executable
) -> tuple[list[str], dict[str, str]]:
    """Return the torchrun argv and the environment for it.

    Every rank's stdout/stderr is written under `<run_dir>/logs/` and teed (`--tee 3`); `job.py`
    shows rank 0's output and only the other ranks' stderr. Rendezvous is c10d in every case: on one node at a free
    local port, on many at MASTER_ADDR:MASTER_PORT with node rank 0 hosting the store.
    """
    argv = [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(spec.nodes),
        "--nproc-per-node", str(spec.nproc),
        "--node-rank", str(spec.node_rank),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{spec.master_addr}:{spec.master_port}",
        "--rdzv-id", spec.name,
        "--rdzv-conf", f"is_host={1 if spec.node_rank == 0 else 0}",
        "--max-restarts", str(spec.max_restarts),
        "--log-dir", spec.log_dir,
        "--tee", "3",
        spec.recipe,
        *spec.recipe_args,
    ]
    return argv, {**worker_env(spec, cpus, base_env), "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": LINE_PREFIX_TEMPLATE}
