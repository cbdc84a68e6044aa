"""Data parallelism: DDP, FSDP2 (`fully_shard` on each block, then on the root), or DeepSpeed ZeRO.

One object per Context. It wraps the model, turns gradient synchronisation off on the
accumulation steps that do not end a window, runs backward and the optimizer step, and
measures gradient norms the way the parameters are laid out (sharded ones need every rank).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from dtrain import config
from dtrain.errors import UsageError
from dtrain.runtime.activation_checkpointing import blocks_of
from dtrain.runtime.env import WorkerEnv
from dtrain.runtime.precision import Precision
from dtrain.runtime import shared_memory


class DataParallel:
    """DDP: every rank holds the whole model; gradients are averaged in backward."""

    name = "ddp"
    sharded = False  # parameters split across ranks: norms and full state dicts need every rank
    loss_scaler = "amp"  # fp16's: see Precision

    def __init__(self, env: WorkerEnv, device: torch.device):
        self.env = env
        self.device = device

    def wrap(self, model: nn.Module, block_classes: tuple[str, ...], optimizers: Sequence[torch.optim.Optimizer],
             batch_size: int | None) -> nn.Module:
        model = model.to(self.device)
        if self.env.world_size == 1:
            return model
        if self.device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[self.device.index])
        model = DistributedDataParallel(model)
        shared = shared_memory.for_ddp(self.env.rank, self.env.world_size, self.device,
                                       [p.numel() for p in model.parameters() if p.requires_grad])
        if shared is not None:  # every rank on this host: faster than gloo (see shared_memory)
            model.register_comm_hook(shared, shared_memory.comm_hook)
        return model

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Before the forward pass: DDP decides there whether this backward all-reduces."""
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = enabled

    def backward(self, model: nn.Module, loss: torch.Tensor, precision: Precision, grad_accum: int) -> None:
        precision.backward(loss / grad_accum if grad_accum > 1 else loss)

    def grad_norm(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], precision: Precision,
                  is_main: bool) -> torch.Tensor | None:
        if not (is_main or self.sharded):
            return None
        for optimizer in optimizers:
            precision.unscale(optimizer)
        norm = total_norm(p.grad for p in model.parameters() if p.grad is not None)
        return norm if is_main else None

    def clip_grad_norm(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], precision: Precision,
                       max_norm: float) -> torch.Tensor:
        for optimizer in optimizers:
            precision.unscale(optimizer)
        return whole(torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm))

    def step(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], precision: Precision,
             measure_grad_norm: bool, is_main: bool) -> torch.Tensor | None:
        norm = self.grad_norm(model, optimizers, precision, is_main) if measure_grad_norm else None
        for optimizer in optimizers:
            precision.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
        return norm

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def close(self, model: nn.Module) -> None:
        """Before the process group goes."""

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's plain state_dict on CPU, on rank 0 (call it on every rank)."""
        return get_model_state_dict(self.unwrap(model), options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))


def make_parameters_contiguous(model: nn.Module) -> None:
    """FSDP2 and ZeRO shard parameters as flat memory, which a channels_last weight is not: such a
    parameter gets a contiguous copy of its values in place (optimizers made before still hold it).
    The convolutions then run in the default layout."""
    for param in model.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()


class FullyShardedDataParallel(DataParallel):
    """FSDP2: each rank holds a shard of every parameter; blocks are gathered one at a time."""

    name = "fsdp"
    sharded = True
    loss_scaler = "sharded"

    def wrap(self, model: nn.Module, block_classes: tuple[str, ...], optimizers: Sequence[torch.optim.Optimizer],
             batch_size: int | None) -> nn.Module:
        """Shard in place. `fully_shard` replaces every parameter with a sharded one, so optimizers
        made before (as a plain PyTorch recipe makes them) are pointed at the new parameters."""
        from torch.distributed.fsdp import fully_shard

        model = model.to(self.device)
        if self.env.world_size == 1:
            return model
        make_parameters_contiguous(model)
        names = {id(p): name for name, p in model.named_parameters()}
        for block in blocks_of(model, block_classes):
            fully_shard(block)
        fully_shard(model)
        sharded = dict(model.named_parameters())
        for optimizer in optimizers:
            if optimizer.state:
                raise RuntimeError("prepare the model before the optimizer's first step: FSDP replaces its parameters.")
            for group in optimizer.param_groups:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        return model

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(enabled)


class DeepSpeedZero(DataParallel):
    """ZeRO stage 1-3 through `deepspeed.initialize`, with the recipe's own optimizer.

    The engine owns backward (loss scaling, averaging over the accumulation window), the step,
    and its checkpoint files; the gradient norm is the one the step computed.
    """

    sharded = True
    loss_scaler = "engine"

    def __init__(self, env: WorkerEnv, device: torch.device):
        super().__init__(env, device)
        self.name = env.strategy

    def wrap(self, model: nn.Module, block_classes: tuple[str, ...], optimizers: Sequence[torch.optim.Optimizer],
             batch_size: int | None) -> nn.Module:
        import deepspeed

        if len(optimizers) != 1:
            raise UsageError(f"--strategy {self.name} needs exactly one optimizer passed to ctx.prepare "
                             f"(got {len(optimizers)}).")
        settings = self.deepspeed_config(batch_size)
        model = model.to(self.device)
        make_parameters_contiguous(model)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizers[0], config=settings,
                                               dist_init_required=False)
        self.unlink_shared_memory()
        return engine

    def unlink_shared_memory(self) -> None:
        """DeepSpeed's CPU all-reduce maps one /dev/shm file per rank when all ranks share a host
        (LOCAL_SIZE, set by its launcher) and never removes them: 69 MB per rank per run, kept in
        memory until reboot. Once every rank has mapped every file (`initialize` waits for that;
        the barrier for the slowest), each rank unlinks its own: the mappings stay, the names go."""
        torch.distributed.barrier()
        name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
               f"{os.environ.get('MASTER_PORT', '')}_{self.env.rank}"
        Path(shared_memory.SHM_DIR, name).unlink(missing_ok=True)

    def deepspeed_config(self, batch_size: int | None) -> dict[str, Any]:
        """The launch's merged JSON (or, under plain torchrun, the default one) with the recipe's batch size."""
        if self.env.deepspeed_config:
            with open(self.env.deepspeed_config) as fh:
                settings = json.load(fh)
        else:
            default = config.load_deepspeed_json(str(config.DEEPSPEED_CONFIGS / f"{self.name}.json"))
            settings = config.merge_deepspeed_config(default, int(self.name[-1]), self.env.precision,
                                                     self.env.grad_accum, f"launch/deepspeed/{self.name}.json")
        micro = settings.get("train_micro_batch_size_per_gpu", "auto")
        if micro == "auto":
            micro = batch_size or 1
        elif batch_size is not None and micro != batch_size:
            raise UsageError(f"the DeepSpeed config sets train_micro_batch_size_per_gpu {micro}, but the recipe's "
                             f"batch size is {batch_size}; make them agree (or set it to \"auto\").")
        total = micro * self.env.grad_accum * self.env.world_size
        if settings.get("train_batch_size", "auto") not in ("auto", total):
            raise UsageError(f"the DeepSpeed config sets train_batch_size {settings['train_batch_size']}, but "
                             f"{micro} per process x {self.env.grad_accum} accumulation x {self.env.world_size} "
                             f"processes is {total}; make them agree (or set it to \"auto\").")
        return {**settings, "train_micro_batch_size_per_gpu": micro, "train_batch_size": total}

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        model.set_gradient_accumulation_boundary(enabled)

    def backward(self, model: nn.Module, loss: torch.Tensor, precision: Precision, grad_accum: int) -> None:
        model.backward(loss)

    def grad_norm(self, model, optimizers, precision, is_main):
        raise UsageError(f"under --strategy {self.name} the gradient norm comes from the step: "
                         "use ctx.step(measure_grad_norm=True).")

    def clip_grad_norm(self, model, optimizers, precision, max_norm):
        raise UsageError(f"under --strategy {self.name} DeepSpeed clips gradients itself: set \"gradient_clipping\" "
                         "in the DeepSpeed config (--deepspeed-config) instead of calling ctx.clip_grad_norm.")

    def step(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], precision: Precision,
             measure_grad_norm: bool, is_main: bool) -> torch.Tensor | None:
        model.step()
        norm = model.get_global_grad_norm() if measure_grad_norm and is_main else None
        return None if norm is None else torch.as_tensor(float(norm))

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def close(self, model: nn.Module) -> None:
        """Without this, ZeRO-3 processes sometimes abort at exit (SIGABRT) after all work is done."""
        model.destroy()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.name == "zero3":
            state = model._zero3_consolidated_16bit_state_dict()  # gathered onto rank 0
        else:
            state = model.module.state_dict()
        return {k: v.detach().cpu() for k, v in (state or {}).items()}


def make_strategy(env: WorkerEnv, device: torch.device) -> DataParallel:
    if env.strategy.startswith("zero"):
        return DeepSpeedZero(env, device)
    strategies = {s.name: s for s in (DataParallel, FullyShardedDataParallel)}
    if env.strategy not in strategies:
        raise UsageError(f"unknown strategy {env.strategy!r}; use one of {', '.join(config.STRATEGIES)}.")
    return strategies[env.strategy](env, device)


def total_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together; sharded (DTensor) ones are reduced across ranks."""
    return whole(torch.nn.utils.get_total_norm(list(tensors), foreach=True))


def whole(norm: torch.Tensor) -> torch.Tensor:
    """A norm of sharded gradients is a DTensor holding this rank's part: reduce it (a collective)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
