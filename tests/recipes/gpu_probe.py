"""Prints, per rank, the process group's backend and device and the result of one all-reduce."""

import json

import torch
import torch.distributed as dist

from dtrain.runtime import setup

ctx = setup()
total = ctx.all_reduce(torch.tensor([float(ctx.rank + 1)], device=ctx.device))
print(json.dumps({"rank": ctx.rank, "world": ctx.world_size, "device": str(ctx.device),
                  "backend": dist.get_backend() if dist.is_initialized() else None, "sum": total.item()}), flush=True)
ctx.close()
