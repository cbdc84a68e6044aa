"""Test recipe: one epoch of 16 samples in batches of 4 on a linear model; each rank writes which
samples it trained on, how many steps it took, and its parameters to <run_dir>/rank<R>.json."""

import json
import os

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dtrain.runtime import setup

ctx = setup()
torch.manual_seed(0)  # the same initial model on every rank
model = nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = ctx.prepare(model, optimizer)
samples = torch.arange(16)
data = TensorDataset(samples, torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
loader = ctx.loader(data, batch_size=4)
loader.set_epoch(0)
seen, steps = [], 0
for index, x in loader:
    seen += index.tolist()
    loss = model(x).pow(2).mean()
    ctx.backward(loss)
    ctx.step()
    steps += 1
record = {"rank": ctx.rank, "world_size": ctx.world_size, "launcher_world": os.environ.get("WORLD_SIZE"),
          "seen": seen, "steps": steps, "params": [p.detach().flatten().tolist() for p in ctx.unwrap(model).parameters()]}
with open(os.path.join(os.environ["DTRAIN_RUN_DIR"], f"rank{ctx.rank}.json"), "w") as fh:
    json.dump(record, fh)
ctx.close()
