"""Test recipe: Trainer on a small classifier, checkpointing through a DCP StorageWriter that fails
on one rank, like a full or failing disk there. FAULT=<errno name>:<rank>:<save> (e.g. ENOSPC:1:2)
makes that rank's shard write of that save raise; without FAULT it is DCP's file writer."""

import errno
import os

import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.utils.data import TensorDataset

from dtrain.runtime import Trainer, setup
from dtrain.runtime.checkpoint import Checkpointer

fault = os.environ.get("FAULT")


class FaultyWriter(FileSystemWriter):
    saves = 0

    def __init__(self, path):
        super().__init__(path, sync_files=True)
        FaultyWriter.saves += 1

    def write_data(self, plan, planner):
        name, rank, save = fault.split(":")
        if int(rank) == ctx.rank and int(save) == FaultyWriter.saves:
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code))
        return super().write_data(plan, planner)


ctx = setup()
if fault:
    env = ctx.env
    ctx.checkpointer = Checkpointer(ctx.run_dir, env.rank, env.world_size, keep_last=env.keep_last,
                                    async_save=env.async_checkpoint, strategy=env.strategy, storage=FaultyWriter)
generator = torch.Generator().manual_seed(0)
x = torch.randn(160, 8, generator=generator)
y = (x[:, :2].sum(1) > 0).long()
torch.manual_seed(1)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
trainer = Trainer(ctx, model, torch.optim.AdamW(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), batch_size=8,
                  log_every=5)
trainer.fit(TensorDataset(x, y), None, epochs=2)
trainer.save_model()
ctx.close()
