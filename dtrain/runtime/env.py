"""What a worker learns from its environment: the launcher's rank variables and the DTRAIN_* contract.

Works the same under `dtrain launch`, plain `torchrun`, `srun` (SLURM_* variables) and plain
`python recipe.py` (a world of one).
"""

from __future__ import annotations

import dataclasses
import os
import socket
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
    preempt_signal: str  # checkpoint and stop on this signal
    max_requeues: int
    slurm_job_id: str | None
    requeue_count: int  # SLURM_RESTART_COUNT: how often SLURM has requeued this job
    node_name: str  # SLURM's name for this node (logical nodes may share a hostname), else the hostname
    wandb: str  # auto, online, offline, disabled
    wandb_project: str
    wandb_entity: str | None
    wandb_group: str | None
    tags: tuple[str, ...]
    tty: str | None  # where rank 0 may draw a progress bar
    strategy: str = "ddp"
    grad_accum: int = 1
    activation_checkpointing: str | None = None  # "auto" (the recipe's blocks) or comma-separated class names
    deepspeed_config: str | None = None
    launched_world_size: int | None = None  # what `dtrain launch` asked the launcher for
    launch_time: float | None = None  # when `dtrain launch` started (Unix time)


def read_env(environ: Mapping[str, str] | None = None) -> WorkerEnv:
    environ = os.environ if environ is None else environ

    def first(*names: str, default: str) -> str:
        return next((environ[n] for n in names if environ.get(n)), default)

    max_steps = environ.get(config.ENV_MAX_STEPS)
    keep_last = environ.get(config.ENV_KEEP_LAST)
    checkpoint_steps, checkpoint_epochs = config.parse_checkpoint_every(
        environ.get(config.ENV_CHECKPOINT_EVERY) or "epoch")
    requeue_count = int(environ.get("SLURM_RESTART_COUNT") or 0)
    # A requeued job continues from its own newest checkpoint, whatever --resume chose for the first run.
    resume = "auto" if requeue_count > 0 else environ.get(config.ENV_RESUME) or "auto"
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
        resume=resume,
        async_checkpoint=environ.get(config.ENV_ASYNC_CHECKPOINT) == "1",
        preempt_signal=environ.get(config.ENV_PREEMPT_SIGNAL) or config.DEFAULT_PREEMPT_SIGNAL,
        max_requeues=int(environ.get(config.ENV_MAX_REQUEUES) or config.DEFAULT_MAX_REQUEUES),
        slurm_job_id=environ.get("SLURM_JOB_ID") or None,
        requeue_count=requeue_count,
        node_name=environ.get("SLURMD_NODENAME") or socket.gethostname(),
        wandb=environ.get(config.ENV_WANDB) or "auto",
        wandb_project=environ.get(config.ENV_WANDB_PROJECT) or config.DEFAULT_WANDB_PROJECT,
        wandb_entity=environ.get(config.ENV_WANDB_ENTITY) or None,
        wandb_group=environ.get(config.ENV_WANDB_GROUP) or None,
        tags=tuple(t for t in (environ.get(config.ENV_TAGS) or "").split(",") if t),
        tty=environ.get(config.ENV_TTY) or None,
        strategy=environ.get(config.ENV_STRATEGY) or "ddp",
        grad_accum=int(environ.get(config.ENV_GRAD_ACCUM) or 1),
        activation_checkpointing=environ.get(config.ENV_ACTIVATION_CHECKPOINTING) or None,
        deepspeed_config=environ.get(config.ENV_DEEPSPEED_CONFIG) or None,
        launched_world_size=int(environ[config.ENV_WORLD_SIZE]) if environ.get(config.ENV_WORLD_SIZE) else None,
        launch_time=float(environ[config.ENV_LAUNCH_TIME]) if environ.get(config.ENV_LAUNCH_TIME) else None,
    )
