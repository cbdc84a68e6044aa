"""fp32 / bf16 / fp16: an autocast context and, for fp16, a GradScaler against underflow."""

from __future__ import annotations

import contextlib

import torch

from dtrain.errors import UsageError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device, scaler: str = "amp", graphed: bool = False):
        """`scaler`: which loss scaler fp16 uses: "amp" (GradScaler), "sharded" (ShardedGradScaler, for FSDP,
        whose ranks must agree on skipping a step), or "engine" (DeepSpeed scales the loss itself).
        `graphed` (--cuda-graph): autocast without its cache of cast weights, which a CUDA graph cannot hold."""
        if name not in ("fp32", *_DTYPES):
            raise UsageError(f"unknown precision {name!r} (DTRAIN_PRECISION); use fp32, bf16 or fp16.")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError("bf16 needs a GPU with bfloat16 support (Ampere or newer); use fp16 or fp32.")
        self.name = name
        self.device = device
        self.graphed = graphed
        self.scaler = None
        if name == "fp16" and scaler == "amp":
            self.scaler = torch.amp.GradScaler(device.type)
        elif name == "fp16" and scaler == "sharded":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device.type)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.name], cache_enabled=not self.graphed)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale (before clipping); a no-op without a scaler."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
