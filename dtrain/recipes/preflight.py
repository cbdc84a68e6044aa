"""The preflight that `dtrain doctor --nproc N` / `--gpus N` launches as a recipe: every rank times
a matrix multiplication for a fixed time, all ranks time an all-reduce together, and rank 0 writes
`preflight.json` into the run directory for the doctor to read."""

from __future__ import annotations

import json
import os
import socket
import time

import torch
import torch.distributed as dist

from dtrain.core.rundir import RunDir, write_atomically
from dtrain.runtime import setup

MATMUL_S = 2.0  # every rank multiplies for this long: a rank slowed for part of it still shows
ALL_REDUCES = 10


def timed_matmul(device: torch.device) -> tuple[float, float]:
    """(seconds per multiplication, TFLOP/s) of square matrices: bf16 4096 on a GPU, fp32 256 on a CPU."""
    n, dtype = (4096, torch.bfloat16) if device.type == "cuda" else (256, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < MATMUL_S:
        a @ b
        count += 1
        if device.type == "cuda" and count % 10 == 0:
            torch.cuda.synchronize(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - began) / count
    return seconds, 2 * n**3 / seconds / 1e12


def timed_all_reduce(device: torch.device, world_size: int) -> dict[str, float]:
    """An all-reduce of 256 MB (GPU) or 8 MB (CPU): seconds, and the bus bandwidth as nccl-tests count it."""
    numel = (64 if device.type == "cuda" else 2) * 2**20
    tensor = torch.ones(numel, device=device)
    for _ in range(2):
        dist.all_reduce(tensor)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(ALL_REDUCES):
        dist.all_reduce(tensor)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - began) / ALL_REDUCES
    size = numel * 4
    return {"bytes": size, "seconds": seconds, "bus_gbps": size / seconds * 2 * (world_size - 1) / world_size / 1e9}


def main() -> None:
    ctx = setup()
    ctx.barrier()
    seconds, tflops = timed_matmul(ctx.device)
    mine = {"rank": ctx.rank, "host": socket.gethostname(), "node": ctx.env.node_name, "pid": os.getpid(),
            "matmul_s": seconds, "tflops": tflops}
    ranks: list = [mine]
    if ctx.world_size > 1:
        ranks = [None] * ctx.world_size
        dist.all_gather_object(ranks, mine)
    all_reduce = timed_all_reduce(ctx.device, ctx.world_size) if ctx.world_size > 1 else None
    if ctx.is_main:
        result = {"device": ctx.device.type, "world_size": ctx.world_size, "ranks": ranks, "all_reduce": all_reduce}
        write_atomically(RunDir(ctx.run_dir).preflight, json.dumps(result, indent=1))
    ctx.close()


if __name__ == "__main__":
    main()
