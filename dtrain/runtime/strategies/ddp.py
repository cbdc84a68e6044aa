"""DDP: every rank holds the whole model; gradients are averaged in backward.

DDP's module and DCP's state-dict API are imported where they are used: a world of one needs no DDP,
and a run that saves no checkpoint no DCP (each half a second of start-up)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

from dtrain.core.checkpoints import CheckpointError
from dtrain.runtime import dist as dist_utils
from dtrain.runtime.precision import Precision
from dtrain.runtime.strategies.base import StrategyRuntime, total_norm, whole


class DataParallel(StrategyRuntime):
    def wrap(self, model: nn.Module, block_classes: tuple[str, ...], optimizers: Sequence[torch.optim.Optimizer],
             batch_size: int | None) -> nn.Module:
        model = model.to(self.device)
        if self.env.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        from dtrain.runtime import shared_memory

        if self.device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[self.device.index])
        model = DistributedDataParallel(model)
        shared = shared_memory.for_ddp(self.env.rank, self.env.world_size, self.device,
                                       [p.numel() for p in model.parameters() if p.requires_grad], self.env.timeout)
        if shared is not None:  # every rank on this host: faster than gloo (see shared_memory)
            model.register_comm_hook(shared, shared_memory.comm_hook)
            dist_utils.count_own_collective(shared)
        return model

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """DDP decides in the forward pass whether the backward all-reduces."""
        if _is_ddp(model):
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
        return model.module if _is_ddp(model) else model

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}

    def checkpointable(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> DCPState:
        return DCPState(model, list(optimizers))

    @staticmethod
    def model_weights(folder: Path) -> dict[str, torch.Tensor]:
        from dtrain.runtime import dcp_io

        state = dcp_io.load_whole(folder)
        if "model" not in state:
            raise CheckpointError(f"checkpoint {folder} holds no model state; export the run's model.pth instead.")
        return dict(state["model"])


class DCPState:
    """Model and optimizer state through torch.distributed.checkpoint's state-dict API, which
    knows DDP's and FSDP's layouts: each rank saves and loads its own part."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]):
        self.model, self.optimizers = model, optimizers

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizers)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def write_files(self, folder: Path) -> list[Path]:
        return []

    def read_files(self, folder: Path) -> None:
        pass


def _is_ddp(model: nn.Module) -> TypeGuard[DistributedDataParallel]:
    """Whether `model` is wrapped in DDP; never true before DDP's module is imported."""
    ddp = sys.modules.get("torch.nn.parallel.distributed")
    return ddp is not None and isinstance(model, ddp.DistributedDataParallel)
