"""Rank 1 raises after one collective; rank 0 keeps waiting in the next one, as a real job would."""

import torch

from dtrain.runtime import setup

ctx = setup()
ctx.all_reduce(torch.ones(1))
if ctx.rank == 1:
    raise ValueError("rank 1 exploded on purpose")
while True:
    ctx.all_reduce(torch.ones(1))
