"""The primitives a recipe uses, whatever the hardware: `setup()` returns a `Context`.

A custom loop reads like plain PyTorch with a few calls swapped in:

    ctx = setup(config=vars(args))
    model, optimizer = ctx.prepare(model, optimizer)
    for x, y in ctx.loader(train_set, batch_size=64):
        with ctx.accumulate():                  # only needed for --grad-accum
            with ctx.autocast():
                loss = loss_fn(model(x), y)
            ctx.backward(loss)
        if ctx.sync_gradients:
            ctx.clip_grad_norm(1.0)
            ctx.step()
    ctx.save_model(model)
    ctx.close()
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

import dtrain
from dtrain import engines
from dtrain.core.checkpoints import committed
from dtrain.core.contract import NETWORK_INTERFACES, WorkerEnv, read_env
from dtrain.core.hardware import peak_tflops
from dtrain.core.metrics import HEAL, RESTART, SYSTEM, TRAIN
from dtrain.core.options import parse_checkpoint_every
from dtrain.core.rundir import RunDir
from dtrain.errors import UsageError
from dtrain.outputs.trackers import redact
from dtrain.runtime import activation_checkpointing, checkpoint, performance, replicas, stacks, tracing
from dtrain.runtime import dist as dist_utils
from dtrain.runtime.checkpoint import TrainState
from dtrain.runtime.data import make_loader
from dtrain.runtime.logging import Progress, RunLogger, write_config
from dtrain.runtime.precision import Precision
from dtrain.runtime.preemption import Preemption
from dtrain.runtime.strategies import make_strategy


def setup(config: Mapping[str, Any] | None = None) -> Context:
    """Seed, pick the device, join the process group, and (rank 0) write `config.yaml`."""
    env = read_env(os.environ, engines.job(os.environ))
    # Frozen objects are left out of the interpreter's last collection, which otherwise walks torch's
    # millions of objects as every rank exits (~0.8 s each on a 2-core machine).
    atexit.register(gc.freeze)
    seed_everything(env.seed + env.rank)
    dist_utils.install_error_hook(env)
    device = dist_utils.pick_device(env)
    dist_utils.check_world(env)
    if env.replica_groups > 1:
        replicas.check(env)
    env = dataclasses.replace(env, grad_accum=dist_utils.shrunk_accumulation(env.grad_accum, env.launched_world_size,
                                                                              env.world_size))
    stacks.enable_flight_recorder(env.run_dir)
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
        self.strategy = make_strategy(env, device)
        self.precision = Precision(env.precision, device, scaler=self.strategy.description.loss_scaling,
                                   graphed=env.cuda_graph)
        self._checkpoint_steps, self._checkpoint_epochs = parse_checkpoint_every(env.checkpoint_every)
        self._accumulated = 0  # micro-batches since the last optimizer step
        self._sync = True  # whether the current micro-batch ends an accumulation window
        self._accumulating = False  # whether the loop uses `accumulate` (needed with --grad-accum > 1)
        self.steps = 0  # optimizer steps taken: "the step" of every record and report
        self.log_every = 50  # steps per `system` row (Trainer sets its log_every here)
        peak = env.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device), env.precision)
                                   if device.type == "cuda" else None)
        self.monitor = performance.Monitor(device, env.rank, env.world_size, peak)
        self.tracer = tracing.Tracer(env, device)
        self.watch = stacks.StackWatch(env, lambda: self.steps)
        self.watch.start()
        dist_utils.on_uncaught_error(self.watch.after_error)
        self.run_dir = Path(env.run_dir)
        self.models: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.scheduler = None  # the one `resume(scheduler)` named: a healed replica group takes it from its peer
        self.replicas: replicas.Replicas | None = None
        placement = self._gather((env.node_name, env.node_rank))
        rank_nodes = [name for name, _ in placement]
        self.nodes = sorted({node for _, node in placement})
        self.lost_nodes = dist_utils.lost_nodes(self.nodes, env.launched_world_size, env.world_size)
        self._restarted: tuple[float | None, int | None] | None = None  # the restart row's failure time, old world
        self.logger: RunLogger | None = None
        self.progress: Progress | None = None
        self.run_config: dict[str, Any] = {}
        if self.is_main:
            self.run_config = self.describe(config, rank_nodes)
            write_config(RunDir(self.run_dir).config, self.run_config, self.env.sources)
            self.logger = RunLogger(self.run_dir, env, self.run_config)
            self.progress = Progress(env.tty)
        self.checkpointer = checkpoint.Checkpointer(self.run_dir, env.rank, env.world_size, keep_last=env.keep_last,
                                                    async_save=env.async_checkpoint, strategy=env.strategy)
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
            "cluster_job": {"engine": self.env.engine, "id": self.env.job_id, "requeues": self.env.requeue_count},
            "placement": _placement(),
            "device": self.device.type,
            "hardware": _hardware(self.device),
            "git": _git_commit(Path(sys.argv[0]).resolve().parent),
            "launch": {k: list(v) if isinstance(v, tuple) else redact(v) if isinstance(v, str) else v
                       for k, v in dataclasses.asdict(self.env).items()
                       if k not in ("rank", "local_rank", "node_name", "tty", "error_spool", "sources")},
            "network": {name: os.environ.get(name) for name in ("MASTER_ADDR", *NETWORK_INTERFACES)}
            if self.world_size > 1 else None,
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

    def prepare(self, model: nn.Module, *optimizers: torch.optim.Optimizer, blocks: Sequence[type | str] = (),
                batch_size: int | None = None):
        """Move the model to this rank's device and wrap it for the --strategy (DDP, FSDP2 or a ZeRO engine).

        `blocks` are the model's repeated blocks (classes or class names): FSDP shards each, and
        `--activation-checkpointing` without names checkpoints them. Without them, the model's own
        `_no_split_modules` (how Hugging Face models name their blocks) serve; config.yaml says which.
        `batch_size` (per process) fills DeepSpeed's micro-batch size. Pass the optimizers here (ZeRO
        needs its one).
        """
        recipe_blocks = tuple(b if isinstance(b, str) else b.__name__ for b in blocks)
        source = "the recipe (ctx.prepare(blocks=...))"
        no_split = getattr(model, "_no_split_modules", None)
        if not recipe_blocks and no_split:
            recipe_blocks, source = tuple(sorted(no_split)), "the model's _no_split_modules"
        if recipe_blocks and self.is_main:
            self.run_config["blocks"] = {"classes": list(recipe_blocks), "from": source}
            write_config(RunDir(self.run_dir).config, self.run_config, self.env.sources)
        if self.env.activation_checkpointing:
            checkpointed = activation_checkpointing.checkpointed_classes(self.env.activation_checkpointing,
                                                                         recipe_blocks, model)
            activation_checkpointing.apply(model, checkpointed)
        model = self.strategy.wrap(model, recipe_blocks, optimizers, batch_size)
        if self.env.replica_groups > 1:
            self.replicas = replicas.Replicas(self.env, self.device, self._replica_state, self._load_replica_state)
        if self.env.cuda_graph:
            from dtrain.runtime.cuda_graph import GraphedForward

            GraphedForward(model)
        self.models.append(model)
        self.optimizers.extend(optimizers)
        return (model, *optimizers) if optimizers else model

    def loader(self, dataset, batch_size: int, *, shuffle: bool = True, train: bool = True, num_workers: int = 0,
               collate_fn=None):
        """This rank's batches of `dataset` (a map-style or an iterable one), on the device, in any structure
        the dataset and `collate_fn` give; call `set_epoch(epoch)` on it before each epoch. `train`: every rank
        the same number of batches (padding by wrap-around, or whole rounds of a stream); otherwise each sample
        once over all ranks (evaluation)."""
        groups = self.env.replica_groups if train else 1  # replica groups train on shards of their own
        loader = make_loader(dataset, batch_size, rank=self.env.replica_group * self.world_size + self.rank
                             if train else self.rank, world_size=groups * self.world_size, device=self.device,
                             shuffle=shuffle, seed=self.env.seed, train=train, num_workers=num_workers,
                             collate_fn=collate_fn)
        return performance.timed(loader, self.monitor.clock) if train else loader

    def autocast(self):
        """Around the forward pass (this process's first training step's FLOPs are counted from here to
        `backward`)."""
        if self.models and self.models[0].training:
            self.monitor.flops.start()
        return self.precision.autocast()

    @contextlib.contextmanager
    def accumulate(self, last: bool = False) -> Iterator[None]:
        """Around the forward and backward of one micro-batch.

        With --grad-accum N, gradients are synchronised across ranks and applied only on every
        N-th micro-batch, or on `last` (the end of the epoch); `sync_gradients` says whether this
        one does, and `step()` is a no-op otherwise.
        """
        self._accumulating = True
        self._accumulated += 1
        if self.replicas is not None:
            self.replicas.begin()
        self._sync = last or self._accumulated >= self.env.grad_accum
        for model in self.models:
            self.strategy.set_gradient_sync(model, self._sync)
        yield

    @property
    def sync_gradients(self) -> bool:
        return self._sync

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the loss, averaged over the accumulation window (scaled for fp16)."""
        if self.replicas is not None:
            self.replicas.begin()
        self.strategy.backward(self._model(), loss, self.precision, self.env.grad_accum)
        if self.replicas is not None:
            self.replicas.average(self._model())
        self._end_flop_count()

    def _end_flop_count(self) -> None:
        if self.monitor.flops.stop(self.monitor.clock.last_batch_size) and self.is_main:
            self.run_config["flops_per_sample"] = self.monitor.flops.per_sample
            write_config(RunDir(self.run_dir).config, self.run_config, self.env.sources)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the prepared model's gradients by total norm, after undoing fp16 loss scaling; returns the
        total norm before clipping. Under ZeRO the engine clips inside `step()`: the returned tensor
        holds the norm once `ctx.step()` has run (read it after the step under every strategy)."""
        return self.strategy.clip_grad_norm(self._model(), self.optimizers, self.precision, max_norm)

    def step(self, measure_grad_norm: bool = False) -> torch.Tensor | None:
        """Apply the gradients and clear them, at the end of an accumulation window (else a no-op).

        With `measure_grad_norm` (on every rank), returns the total gradient norm on rank 0.
        """
        if self.env.grad_accum > 1 and not self._accumulating:
            raise UsageError("--grad-accum needs a loop that wraps each micro-batch in `with ctx.accumulate(...)`; "
                             "use Trainer, or add it to the recipe's loop.")
        self._end_flop_count()  # a loop that calls loss.backward() itself
        if not self._sync:
            return None
        healed = None
        if self.replicas is not None:
            steps, healed = self.replicas.commit(self.steps)
            if steps is None:  # a peer failed during this step: every group drops it
                self.print(f"dtrain: replica group {self.env.replica_group} dropped step {self.steps + 1}: "
                           f"{self.replicas.dropped()}; it goes on with the groups left.")
                for optimizer in self.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                self._accumulated = 0
                return None
            self.steps = steps - 1
        norm = self.strategy.step(self._model(), self.optimizers, self.precision, measure_grad_norm, self.is_main)
        self._accumulated = 0
        self.steps += 1
        self.monitor.clock.steps += 1
        self.tracer.step()
        if self._restarted is not None:
            self._log_restart()
        if healed is not None:
            self.print(f"dtrain: replica group {self.env.replica_group} took a live peer's state at step "
                       f"{self.steps - 1} in {healed['peer_heal_s']} s (it was at step {healed['previous_step']}).")
            self.log(self.steps, healed, kind=HEAL)
        if self.steps % self.log_every == 0:
            self._log_system()
        return norm

    def _say_shrunk(self, state: TrainState | None) -> None:
        batch = (f"the global batch kept: {self.env.grad_accum} micro-batches per step"
                 if dist_utils.keeps_global_batch(self.env.launched_world_size, self.world_size)
                 else "each rank's batch kept: the global batch shrinks with the world")
        self.print(f"dtrain: node{'s' if len(self.lost_nodes) > 1 else ''} {', '.join(map(str, self.lost_nodes))} "
                   f"lost; restarting on {len(self.nodes)} nodes from {f'step {state.step}' if state else 'the start'} "
                   f"({batch}).")

    def _log_restart(self) -> None:
        """The restart row, at the first step of a restarted world: its world, the checkpoint's, and how long it took
        to heal since a rank failed (where a rank's error record says when)."""
        assert self._restarted is not None
        failed, previous = self._restarted
        self._restarted = None
        self.log(self.steps, {"world_size": self.world_size,
                              **({"previous_world_size": previous} if previous is not None else {}),
                              **({"heal_s": round(time.time() - failed, 3)} if failed is not None else {})},
                 kind=RESTART)

    def _log_system(self) -> None:
        """Collective: the interval's `system` row (dtrain.runtime.performance), logged by rank 0."""
        row, warning = self.monitor.row()
        if warning:
            self.print(f"dtrain: {warning}")
        self.log(self.steps, row, kind=SYSTEM)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size > 1:
            began = time.perf_counter()
            dist.all_reduce(tensor, op=op)
            self.monitor.clock.comm_s += time.perf_counter() - began
        return tensor

    def log(self, step: int, values: Mapping[str, Any], kind: str = TRAIN) -> None:
        """Record scalars (rank 0) as a row of `kind` (dtrain.core.metrics). Tensors are read here, so call
        it at an interval, not every step."""
        if self.logger is not None:
            self.logger.log(step, kind, {k: _scalar(v) for k, v in values.items()})

    def log_evaluation(self, step: int, epoch: int, result: Mapping[str, Any]) -> None:
        """Rank 0: the evaluation's report and confusion matrix to `eval/epoch_NNN.json` and W&B."""
        if self.logger is not None:
            self.logger.log_evaluation(step, epoch, result)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.strategy.unwrap(model)

    def save_model(self, model: nn.Module, path: str | os.PathLike | None = None) -> Path:
        """Write the plain `state_dict` (no `module.` prefix) that `model.load_state_dict` takes."""
        path = Path(path) if path is not None else RunDir(self.run_dir).model
        state = self.strategy.full_state_dict(model)  # a collective for sharded strategies
        failure: list[str | None] = [None]
        if self.is_main:
            try:
                checkpoint.save_atomically(state, path)
            except OSError as exc:
                then = (f"write it from the newest checkpoint with `dtrain ckpt export {self.run_dir} --out {path}`"
                        if committed(self.checkpointer.root) else "run again (the run wrote no checkpoint)")
                failure = [f"rank 0 could not write {path} ({exc.strerror or exc}); free space and {then}."]
        if self.world_size > 1:  # also the barrier: no rank goes on before the file is there, or all stop
            dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise UsageError(failure[0])
        return path

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # --- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpointing(self) -> bool:
        """False with --checkpoint-every never."""
        return self._checkpoint_epochs or self._checkpoint_steps is not None

    def checkpoint_due(self, step: int, epoch_end: bool = False) -> bool:
        """Whether the --checkpoint-every policy asks for a checkpoint now."""
        if epoch_end:
            return self._checkpoint_epochs
        return self._checkpoint_steps is not None and step % self._checkpoint_steps == 0

    def save_checkpoint(self, state: TrainState, scheduler=None, metrics: Mapping[str, Any] | None = None) -> None:
        """Checkpoint the prepared model and optimizers, `scheduler`, the GradScaler and `state`."""
        self.checkpointer.save(dataclasses.replace(state, world_size=self.world_size), self._checkpointable(),
                               self._extras(scheduler), {k: _scalar(v) for k, v in (metrics or {}).items()})

    def resume(self, scheduler=None) -> TrainState | None:
        """Load the checkpoint --resume selects (auto: the run's newest good one), or return None.

        The RNG states are restored later, by `restore_rng()`, once the data iterator of the
        resumed epoch exists: creating it may draw random numbers.
        """
        self.scheduler = scheduler
        path, notes, state, extras, self._rng_to_restore = self.checkpointer.resume(
            self.env.resume, self._checkpointable(), self._extras(scheduler))
        for note in notes:
            self.print(f"dtrain: {note}")
        if dist_utils.attempt() > 0:
            self._restarted = (dist_utils.failed_at(self.env), state.world_size if state is not None else None)
        if self.lost_nodes:
            self._say_shrunk(state)
        if path is None or state is None:
            return None
        self.steps = state.step
        if self.replicas is not None:
            self.replicas.resumed(state.step)
        if self.logger is not None:
            self.logger.resumed()
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
            raise UsageError(f"dtrain needs exactly one model prepared with ctx.prepare(model, optimizer) before "
                             f"this call, and found {len(self.models)}; prepare one model, first.")
        return self.models[0]

    def _replica_state(self) -> dict[str, Any]:
        """What a replica group that starts again takes from a live one (torchft sends it over the process group)."""
        return {"model": self.unwrap(self._model()).state_dict(),
                "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
                **self._extras(self.scheduler)}

    def _load_replica_state(self, state: dict[str, Any]) -> None:
        self.unwrap(self._model()).load_state_dict(state["model"])
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None:
            self.precision.scaler.load_state_dict(state["scaler"])

    def _checkpointable(self):
        return self.strategy.checkpointable(self._model(), self.optimizers)

    def _extras(self, scheduler) -> dict[str, Any]:
        extras = {}
        if scheduler is not None:
            extras["scheduler"] = scheduler.state_dict()
        if self.precision.scaler is not None:
            extras["scaler"] = self.precision.scaler.state_dict()
        return extras

    def close(self) -> None:
        if self.monitor.clock.steps:  # the last, shorter interval, with the run's memory peaks
            self._log_system()
        self.tracer.close()
        self.checkpointer.wait()
        if self.logger is not None:
            self.logger.close()
        for model in self.models:
            self.strategy.close(model)
        if self.replicas is not None:
            self.replicas.close()
        self.watch.close()
        dist_utils.destroy_process_group()


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def _placement() -> dict[str, Any] | None:
    """Where the cluster engine placed this node, as `dtrain launch` read it; None outside a job."""
    try:
        where = engines.allocation(os.environ)
    except UsageError:  # srun started the workers themselves, several on a node: no launch read a placement
        return None
    if where is None:
        return None
    return {"nodes": where.nodes, "node_rank": where.node_rank, "rank0": f"{where.first_host}:{where.master_port}"}


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
