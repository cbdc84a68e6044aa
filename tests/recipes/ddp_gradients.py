"""Per rank: the comm hook DDP uses on this CPU, and whether the gradients it averaged equal the
mean that gloo's all-reduce gives of every rank's own gradients (a few steps, other data per rank)."""

import json

import torch
from torch import nn

from dtrain.runtime import setup

ctx = setup()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 1100), nn.ReLU(), nn.Linear(1100, 300), nn.ReLU(), nn.Linear(300, 10))
model, optimizer = ctx.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
equal = []
for step in range(5):
    generator = torch.Generator().manual_seed(100 * step + ctx.rank)
    x, y = torch.randn(16, 256, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    with model.no_sync():
        nn.functional.cross_entropy(model(x), y).backward()
    expected = [ctx.all_reduce(p.grad.clone()) / ctx.world_size for p in model.parameters()]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    equal.append(all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected)))
    optimizer.step()
    optimizer.zero_grad()
print(json.dumps({"rank": ctx.rank, "comm_hook": model._get_ddp_logging_data().get("comm_hook"), "equal": equal}),
      flush=True)
ctx.close()
