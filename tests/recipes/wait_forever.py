"""Every rank joins the group, says it is ready, then trains forever (until a signal stops it)."""

import time

import torch

from dtrain.runtime import setup

ctx = setup()
ctx.barrier()
print(f"ready rank {ctx.rank}", flush=True)
while True:
    ctx.all_reduce(torch.ones(1))
    time.sleep(0.05)
