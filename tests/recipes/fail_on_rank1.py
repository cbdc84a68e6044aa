"""Rank 1 (or FAIL_RANK) raises after one collective; the others keep waiting in the next one, as a real
job would."""

import os

import torch

from dtrain.runtime import setup

ctx = setup()
ctx.all_reduce(torch.ones(1))
failing = int(os.environ.get("FAIL_RANK", "1"))
if ctx.rank == failing:
    raise ValueError(f"rank {failing} exploded on purpose")
while True:
    ctx.all_reduce(torch.ones(1))
