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
    checkpoint_steps: int | None  # save every N optimizer steps
    checkpoint_epochs: bool  # save at the end of each epoch
    keep_last: int | None
    resume: str  # auto, never, or a checkpoint folder
    async_checkpoint: bool


def read_env(environ: Mapping[str, str] | None = None) -> WorkerEnv:
    environ = os.environ if environ is None else environ

    def first(*names: str, default: str) -> str:
        return next((environ[n] for n in names if environ.get(n)), default)

    max_steps = environ.get(config.ENV_MAX_STEPS)
    keep_last = environ.get(config.ENV_KEEP_LAST)
    checkpoint_steps, checkpoint_epochs = config.parse_checkpoint_every(
        environ.get(config.ENV_CHECKPOINT_EVERY) or "epoch")
    return WorkerEnv(
        rank=int(first("RANK", "SLURM_PROCID", default="0")),
        local_rank=int(first("LOCAL_RANK", "SLURM_LOCALID", default="0")),
        world_size=int(first("WORLD_SIZE", "SLURM_NTASKS", default="1")),
        device=environ.get(config.ENV_DEVICE) or None,
        precision=environ.get(config.ENV_PRECISION) or "fp32",
        seed=int(environ.get(config.ENV_SEED) or 0),
        run_dir=environ.get(config.ENV_RUN_DIR) or os.path.join("runs", "default"),
        max_steps=int(max_steps) if max_steps else None,
        checkpoint_steps=checkpoint_steps,
        checkpoint_epochs=checkpoint_epochs,
        keep_last=int(keep_last) if keep_last else None,
        resume=environ.get(config.ENV_RESUME) or "auto",
        async_checkpoint=environ.get(config.ENV_ASYNC_CHECKPOINT) == "1",
    )
