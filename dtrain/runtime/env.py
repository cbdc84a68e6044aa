"""What a worker learns from its environment: the launcher's rank variables and the DTRAIN_* contract.

Works the same under `dtrain launch`, plain `torchrun`, `srun` (SLURM_* variables) and plain
`python recipe.py` (a world of one).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from dtrain import config


@dataclasses.dataclass(frozen=True)
class WorkerEnv:
    rank: int
    local_rank: int
    world_size: int
    device: str | None  # "cuda", "cpu", or None: pick cuda when available
    precision: str
    seed: int
    run_dir: str
    max_steps: int | None


def read_env(environ: Mapping[str, str] | None = None) -> WorkerEnv:
    environ = os.environ if environ is None else environ

    def first(*names: str, default: str) -> str:
        return next((environ[n] for n in names if environ.get(n)), default)

    max_steps = environ.get(config.ENV_MAX_STEPS)
    return WorkerEnv(
        rank=int(first("RANK", "SLURM_PROCID", default="0")),
        local_rank=int(first("LOCAL_RANK", "SLURM_LOCALID", default="0")),
        world_size=int(first("WORLD_SIZE", "SLURM_NTASKS", default="1")),
        device=environ.get(config.ENV_DEVICE) or None,
        precision=environ.get(config.ENV_PRECISION) or "fp32",
        seed=int(environ.get(config.ENV_SEED) or 0),
        run_dir=environ.get(config.ENV_RUN_DIR) or os.path.join("runs", "default"),
        max_steps=int(max_steps) if max_steps else None,
    )
