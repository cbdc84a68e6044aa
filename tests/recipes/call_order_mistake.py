"""A recipe author's mistake: ctx.step() before ctx.prepare(), on the ranks named in argv[1] ("all" or a rank)."""

import sys

import torch

from dtrain.runtime import setup

ctx = setup()
ctx.all_reduce(torch.ones(1))
if sys.argv[1] in ("all", str(ctx.rank)):
    ctx.step()
while True:  # the other ranks wait in the next collective, as in a real job
    ctx.all_reduce(torch.ones(1))
