"""What a strategy does at run time: wrap the model, turn gradient synchronisation off inside an
accumulation window, run backward and the optimizer step, measure and clip gradient norms the way
the parameters are laid out, and say what a checkpoint holds of the model and optimizers."""

from __future__ import annotations

import abc
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dtrain.core.contract import WorkerEnv
from dtrain.core.strategies import Strategy
from dtrain.runtime.precision import Precision


class Checkpointable(Protocol):
    """The model and optimizers as a checkpoint holds them: state that DCP saves and loads in place,
    and files a strategy's engine writes and reads itself (none for most)."""

    def state_dict(self) -> dict[str, Any]:
        """What DCP saves, and the template it loads into (`load_state_dict` then applies it)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def write_files(self, folder: Path) -> list[Path]:
        """Write the engine's own files into `folder` durably (fsync); return those this rank wrote."""

    def read_files(self, folder: Path) -> None: ...


class StrategyRuntime(abc.ABC):
    sharded = False  # parameters split across ranks: norms and full state dicts need every rank

    def __init__(self, description: Strategy, env: WorkerEnv, device: torch.device):
        self.description = description
        self.env = env
        self.device = device

    @property
    def name(self) -> str:
        return self.description.name

    @abc.abstractmethod
    def wrap(self, model: nn.Module, block_classes: tuple[str, ...], optimizers: Sequence[torch.optim.Optimizer],
             batch_size: int | None) -> nn.Module:
        """Move the model to the device and wrap it; optimizers made before keep working."""

    @abc.abstractmethod
    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Before the forward pass: whether this micro-batch's backward synchronises gradients."""

    @abc.abstractmethod
    def backward(self, model: nn.Module, loss: torch.Tensor, precision: Precision, grad_accum: int) -> None:
        """Backward of `loss`, averaged over the accumulation window (scaled under fp16)."""

    @abc.abstractmethod
    def clip_grad_norm(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], precision: Precision,
                       max_norm: float) -> torch.Tensor:
        """Clip the gradients by their total norm (after undoing loss scaling); return that norm."""

    @abc.abstractmethod
    def step(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], precision: Precision,
             measure_grad_norm: bool, is_main: bool) -> torch.Tensor | None:
        """Apply the gradients and clear them; with `measure_grad_norm`, the total norm on rank 0."""

    @abc.abstractmethod
    def unwrap(self, model: nn.Module) -> nn.Module:
        """The recipe's own module inside the wrapper."""

    @abc.abstractmethod
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's plain state_dict on CPU, on rank 0 (call it on every rank)."""

    @abc.abstractmethod
    def checkpointable(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> Checkpointable:
        """What the checkpointer saves and loads of the model and optimizers."""

    @staticmethod
    @abc.abstractmethod
    def model_weights(folder: Path) -> dict[str, torch.Tensor]:
        """The whole model's state_dict from one of this strategy's checkpoints (verified), read in this one
        process on the CPU, whatever the world size and devices that wrote it."""

    def close(self, model: nn.Module) -> None:
        """Before the process group goes."""


def make_parameters_contiguous(model: nn.Module) -> None:
    """FSDP2 and ZeRO shard parameters as flat memory, which a channels_last weight is not: such a
    parameter gets a contiguous copy of its values in place (optimizers made before still hold it).
    The convolutions then run in the default layout."""
    for param in model.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()


def total_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together; sharded (DTensor) ones are reduced across ranks."""
    return whole(torch.nn.utils.get_total_norm(list(tensors), foreach=True))


def whole(norm: torch.Tensor) -> torch.Tensor:
    """A norm of sharded gradients is a DTensor holding this rank's part: reduce it (a collective)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before it is imported
    return norm.full_tensor() if dtensor is not None and isinstance(norm, dtensor.DTensor) else norm
