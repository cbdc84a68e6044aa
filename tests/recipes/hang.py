"""Test recipe: a custom loop on a small linear model. With --hang-at N, rank 1 falls asleep after
its N-th optimizer step, before the loop's all-reduce (the hang report must name the line); with
--slow-ms M, rank 1 computes M ms longer each step. It trains --steps steps, or until
$DTRAIN_RUN_DIR/stop appears, then ends normally."""

import argparse
import os
import time

import torch
from torch import nn

from dtrain.runtime import setup

parser = argparse.ArgumentParser()
parser.add_argument("--hang-at", type=int, default=None)
parser.add_argument("--slow-ms", type=float, default=0.0)
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--log-every", type=int, default=50)
args = parser.parse_args()
ctx = setup()
ctx.log_every = args.log_every
torch.manual_seed(0)
model = nn.Linear(8, 1)
model, optimizer = ctx.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
stop = torch.zeros(1)
while not stop.item():
    loss = model(torch.randn(16, 8)).pow(2).mean()
    if ctx.rank == 1:
        time.sleep(args.slow_ms / 1000)
    ctx.backward(loss)
    ctx.step()
    if ctx.rank == 1 and ctx.steps == args.hang_at:
        time.sleep(3600)  # the hang
    stop.fill_(float(ctx.steps == args.steps or os.path.exists(os.path.join(os.environ["DTRAIN_RUN_DIR"], "stop"))))
    ctx.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
    time.sleep(0.01)
ctx.close()
