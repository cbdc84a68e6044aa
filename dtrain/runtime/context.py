"""The primitives a recipe uses, whatever the hardware: `setup()` returns a `Context`.

A custom loop reads like plain PyTorch with a few calls swapped in:

    ctx = setup(config=vars(args))
    model, optimizer = ctx.prepare(model, optimizer)
    for x, y in ctx.loader(train_set, batch_size=64):
        with ctx.autocast():
            loss = loss_fn(model(x), y)
        ctx.backward(loss)
        ctx.clip_grad_norm(1.0)
        ctx.step()
    ctx.save_model(model)
    ctx.close()
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dtrain
from dtrain.runtime import checkpoint
from dtrain.runtime import dist as dist_utils
from dtrain.runtime.checkpoint import TrainState
from dtrain.runtime.data import make_loader
from dtrain.runtime.env import WorkerEnv, read_env
from dtrain.runtime.logging import Progress, RunLogger, write_config
from dtrain.runtime.precision import Precision
from dtrain.runtime.preemption import Preemption


def setup(config: Mapping[str, Any] | None = None) -> "Context":
    """Seed, pick the device, join the process group, and (rank 0) write `config.yaml`."""
    env = read_env()
    seed_everything(env.seed + env.rank)
    device = dist_utils.pick_device(env)
    dist_utils.install_error_hook(env.rank)
    dist_utils.init_process_group(env, device)
    return Context(env, device, config or {})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


class Context:
    def __init__(self, env: WorkerEnv, device: torch.device, config: Mapping[str, Any]):
        self.env = env
        self.device = device
        self.precision = Precision(env.precision, device)
        self.run_dir = Path(env.run_dir)
        self.models: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        rank_nodes = self._gather(env.node_name)
        self.logger: RunLogger | None = None
        self.progress: Progress | None = None
        if self.is_main:
            run_config = self.describe(config, rank_nodes)
            write_config(self.run_dir / "config.yaml", run_config)
            self.logger = RunLogger(self.run_dir, env, run_config)
            self.progress = Progress(env.tty)
        self.checkpointer = checkpoint.Checkpointer(self.run_dir, env.rank, env.world_size, keep_last=env.keep_last,
                                                    async_save=env.async_checkpoint)
        self._rng_to_restore: dict | None = None
        self.preemption = Preemption(env, device)
        self.preemption.install()

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def max_steps(self) -> int | None:
        return self.env.max_steps

    def describe(self, recipe_config: Mapping[str, Any], rank_nodes: list[str]) -> dict[str, Any]:
        return {
            "dtrain_version": dtrain.__version__,
            "torch_version": str(torch.__version__),
            "recipe": sys.argv[0],
            "recipe_args": sys.argv[1:],
            "world_size": self.world_size,
            "rank_nodes": rank_nodes,
            "slurm_job_id": self.env.slurm_job_id,
            "slurm_requeues": self.env.requeue_count,
            "device": self.device.type,
            "hardware": _hardware(self.device),
            "git": _git_commit(Path(sys.argv[0]).resolve().parent),
            "launch": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.env).items()
                       if k not in ("rank", "local_rank", "node_name", "tty")},
            "precision": self.env.precision,
            "seed": self.env.seed,
            "run_dir": str(self.run_dir),
            "config": dict(recipe_config),
        }

    def _gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (a collective)."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def prepare(self, model: nn.Module, *optimizers: torch.optim.Optimizer):
        """Move the model to this rank's device and wrap it for data parallelism.

        Call it before creating optimizers, or pass them in: the optimizer keeps the same
        parameter objects either way, since DDP wraps rather than copies.
        """
        model = model.to(self.device)
        if self.world_size > 1:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.models.append(model)
        self.optimizers.extend(optimizers)
        return (model, *optimizers) if optimizers else model

    def loader(self, dataset, batch_size: int, *, shuffle: bool = True, train: bool = True, num_workers: int = 0):
        """This rank's batches, on the device; call `set_epoch(epoch)` on it before each epoch."""
        return make_loader(dataset, batch_size, rank=self.rank, world_size=self.world_size, device=self.device,
                           shuffle=shuffle, seed=self.env.seed, train=train, num_workers=num_workers)

    def autocast(self):
        return self.precision.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.backward(loss)

    def grad_norm(self) -> torch.Tensor:
        """Total gradient norm of the prepared models (after undoing fp16 loss scaling), without clipping."""
        for optimizer in self.optimizers:
            self.precision.unscale(optimizer)
        grads = [p.grad for model in self.models for p in model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the prepared models' gradients by total norm, after undoing fp16 loss scaling."""
        for optimizer in self.optimizers:
            self.precision.unscale(optimizer)
        parameters = [p for model in self.models for p in model.parameters()]
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def step(self) -> None:
        """Apply the gradients of every prepared optimizer, then clear them."""
        for optimizer in self.optimizers:
            self.precision.step(optimizer)
            optimizer.zero_grad(set_to_none=True)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op)
        return tensor

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record scalars (rank 0). Tensors are read here, so call it at an interval, not every step."""
        if self.logger is not None:
            self.logger.log(step, {k: _scalar(v) for k, v in metrics.items()})

    def log_evaluation(self, step: int, epoch: int, result: Mapping[str, Any]) -> None:
        """Rank 0: the evaluation's report and confusion matrix to `eval/epoch_NNN.json` and W&B."""
        if self.logger is not None:
            self.logger.log_evaluation(step, epoch, result)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def save_model(self, model: nn.Module, path: str | os.PathLike | None = None) -> Path:
        """Write the plain `state_dict` (no `module.` prefix) that `model.load_state_dict` takes."""
        path = Path(path) if path is not None else self.run_dir / "model.pth"
        if self.is_main:
            state = {k: v.detach().cpu() for k, v in self.unwrap(model).state_dict().items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
        self.barrier()
        return path

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # --- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpointing(self) -> bool:
        """False with --checkpoint-every never."""
        return self.env.checkpoint_epochs or self.env.checkpoint_steps is not None

    def checkpoint_due(self, step: int, epoch_end: bool = False) -> bool:
        """Whether the --checkpoint-every policy asks for a checkpoint now."""
        if epoch_end:
            return self.env.checkpoint_epochs
        return self.env.checkpoint_steps is not None and step % self.env.checkpoint_steps == 0

    def save_checkpoint(self, state: TrainState, scheduler=None, metrics: Mapping[str, Any] | None = None) -> None:
        """Checkpoint the prepared model and optimizers, `scheduler`, the GradScaler and `state`."""
        state = dataclasses.replace(state, world_size=self.world_size,
                                    wandb_run_id=self.logger.run_id if self.logger is not None else None)
        self.checkpointer.save(state, self._model(), self.optimizers, self._extras(scheduler),
                               {k: _scalar(v) for k, v in (metrics or {}).items()})

    def resume(self, scheduler=None) -> TrainState | None:
        """Load the checkpoint --resume selects (auto: the run's newest good one), or return None.

        The RNG states are restored later, by `restore_rng()`, once the data iterator of the
        resumed epoch exists: creating it may draw random numbers.
        """
        path, notes, state, extras, self._rng_to_restore = self.checkpointer.resume(
            self.env.resume, self._model(), self.optimizers, self._extras(scheduler))
        for note in notes:
            self.print(f"dtrain: {note}")
        if path is None:
            return None
        if scheduler is not None:
            scheduler.load_state_dict(extras["scheduler"])
        if self.precision.scaler is not None:
            self.precision.scaler.load_state_dict(extras["scaler"])
        self.print(f"dtrain: resuming from {path} (step {state.step}, epoch {state.epoch + 1}, batch {state.batch})")
        return state

    def preempted(self, step: int) -> bool:
        """True on every rank at the same step once the preemption signal (--preempt-signal) reached any.

        Call it after every optimizer step (it is a collective every few steps); when it says
        True, save a checkpoint and call `stop_for_preemption`.
        """
        return self.preemption.due(step)

    def stop_for_preemption(self, step: int) -> NoReturn:
        """After the preemption checkpoint: let it commit, requeue the SLURM job (rank 0), and exit."""
        self.checkpointer.wait()
        self.barrier()
        self.close()
        if self.is_main:
            self.preemption.stop_and_requeue(step)
        raise SystemExit(0)

    def restore_rng(self) -> None:
        if self._rng_to_restore is not None:
            checkpoint.restore_rng(self._rng_to_restore)
            self._rng_to_restore = None

    def _model(self) -> nn.Module:
        if len(self.models) != 1:
            raise RuntimeError(f"checkpoints need exactly one prepared model, found {len(self.models)}.")
        return self.models[0]

    def _extras(self, scheduler) -> dict[str, Any]:
        extras = {}
        if scheduler is not None:
            extras["scheduler"] = scheduler.state_dict()
        if self.precision.scaler is not None:
            extras["scaler"] = self.precision.scaler.state_dict()
        return extras

    def close(self) -> None:
        self.checkpointer.wait()
        if self.logger is not None:
            self.logger.close()
        dist_utils.destroy_process_group()


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def _hardware(device: torch.device) -> list[str]:
    """The accelerators of this node (rank 0's), or its CPU model."""
    if device.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
    except OSError:
        models = []
    return [f"{models[0] if models else platform.processor() or 'CPU'} ({os.cpu_count()} CPUs)"]


def _git_commit(folder: Path) -> str | None:
    """HEAD of the git repository holding the recipe, with "-dirty" for uncommitted changes; None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")
