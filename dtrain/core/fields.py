"""The options as typed fields, generated from the table in `dtrain.core.options`:
`python -m dtrain.core.options > dtrain/core/fields.py`. A misspelt option fails in the type checker.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """Every worker option: what each worker reads from its DTRAIN_* variable."""

    precision: str
    seed: int
    max_steps: int | None
    checkpoint_every: str
    keep_last: int | None
    resume: str
    async_checkpoint: bool
    wandb: str
    wandb_project: str
    wandb_entity: str | None
    wandb_group: str | None
    tags: tuple[str, ...]
    tensorboard: bool
    mlflow: str | None
    mlflow_experiment: str
    strategy: str
    grad_accum: int
    activation_checkpointing: str | None
    timeout: int
    trace: str | None
    trace_ranks: tuple[str, ...]
    memory_snapshot: bool
    cuda_graph: bool
    peak_tflops: float | None
    replica_groups: int
    replica_group: int
    lighthouse: str | None
    max_requeues: int
    preempt_signal: str


@dataclasses.dataclass(frozen=True)
class SpecOptions(WorkerOptions):
    """What a LaunchSpec holds beyond the worker options: the launcher's."""

    launcher: str
    max_restarts: int
    min_nodes: int | None
    preflight: bool
    rdzv_timeout: int
