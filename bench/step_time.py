"""Where a training step of the MNIST recipe goes, per process: compute, gradient all-reduce, optimizer.

    dtrain launch bench/step_time.py --cpu --nproc 2 -- [--steps 200]

Each of `--steps` steps (after 20 of warm-up) is timed in parts on every rank: forward +
backward without gradient synchronisation (DDP's `no_sync`), waiting at a barrier for the other
ranks to finish theirs, one all-reduce of a buffer as large as all gradients (what DDP sends per
step, in one piece instead of buckets, the way DDP sends it here: through shared memory between
CPU processes of one host, else the process group; communication alone, as every rank enters it
at once), and the optimizer step. Then the same steps run as the recipe runs them (backward with
DDP's all-reduce) to give the real step time. Rank 0 prints one JSON line: the mean milliseconds
of each part (the slowest rank's mean for compute) and samples/s over all ranks.
`bench/compare.py` runs it for 1 and 2 processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from dtrain.runtime import (
    setup,
    shared_memory,
)

import mnist_cnn


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", "./data"))
    args = parser.parse_args()
    ctx = setup()
    train_set, _ = mnist_cnn.load_mnist(ctx, args.data_dir, "memory")
    model, optimizer = mnist_cnn.build(mnist_cnn.parse_args([]))  # the recipe's defaults
    model, optimizer = ctx.prepare(model, optimizer, batch_size=args.batch_size)
    loss_fn = nn.CrossEntropyLoss()
    loader = ctx.loader(train_set, args.batch_size, shuffle=True, train=True)
    loader.set_epoch(0)
    batches = iter(loader)
    no_sync = model.no_sync if ctx.world_size > 1 else nullcontext
    grads = torch.zeros(sum(p.numel() for p in model.parameters()), device=ctx.device)
    # What DDP's backward uses here: shared memory between CPU ranks of one host, else the process group.
    shared = shared_memory.for_ddp(ctx.rank, ctx.world_size, ctx.device, [grads.numel()], ctx.env.timeout)
    all_reduce = shared.average if shared is not None else ctx.all_reduce

    def compute():
        x, y = next(batches)
        with no_sync():
            loss_fn(model(x), y).backward()

    def real_step():
        x, y = next(batches)
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    parts = {"compute_ms": [], "wait_ms": [], "all_reduce_ms": [], "optimizer_ms": [], "step_ms": []}
    for i in range(20 + args.steps):
        ctx.barrier()
        times = (timed(compute), timed(ctx.barrier), timed(lambda: all_reduce(grads)),
                 timed(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True))))
        if i >= 20:
            for name, value in zip(parts, times):
                parts[name].append(value)
    ctx.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        real_step()
    parts["step_ms"] = [(time.perf_counter() - start) * 1000 / args.steps]
    means = torch.tensor([statistics.mean(v) for v in parts.values()], device=ctx.device)
    slowest = ctx.all_reduce(means.clone(), op=dist.ReduceOp.MAX)
    if ctx.is_main:
        result = dict(zip(parts, slowest.tolist()))
        result.update(world_size=ctx.world_size, threads=torch.get_num_threads(), gradient_mb=grads.numel() * 4 / 1e6,
                      samples_per_s=ctx.world_size * args.batch_size * 1000 / result["step_ms"])
        print("STEP_TIME " + json.dumps(result), flush=True)
    ctx.close()


if __name__ == "__main__":
    main()
