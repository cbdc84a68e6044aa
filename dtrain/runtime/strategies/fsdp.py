"""FSDP2: each rank holds a shard of every parameter; blocks are gathered one at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dtrain.errors import UsageError
from dtrain.runtime.activation_checkpointing import blocks_of
from dtrain.runtime.strategies.base import make_parameters_contiguous
from dtrain.runtime.strategies.ddp import DataParallel


class FullyShardedDataParallel(DataParallel):
    """`fully_shard` on each of the recipe's blocks, then on the root; the rest is DDP's (norms of
    sharded gradients are DTensors, reduced across ranks)."""

    sharded = True

    def wrap(self, model: nn.Module, block_classes: tuple[str, ...], optimizers: Sequence[torch.optim.Optimizer],
             batch_size: int | None) -> nn.Module:
        """Shard in place. `fully_shard` replaces every parameter with a sharded one, so optimizers
        made before (as a plain PyTorch recipe makes them) are pointed at the new parameters."""
        from torch.distributed.fsdp import fully_shard

        model = model.to(self.device)
        if self.env.world_size == 1:
            return model
        if any(optimizer.state for optimizer in optimizers):
            raise UsageError("prepare the model (ctx.prepare) before the optimizer's first step: FSDP replaces its "
                             "parameters.")
        make_parameters_contiguous(model)
        names = {id(p): name for name, p in model.named_parameters()}
        for block in blocks_of(model, block_classes):
            fully_shard(block)
        fully_shard(model)
        sharded = dict(model.named_parameters())
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        return model

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(enabled)
