"""What seeing inside a job costs, as added time per step and per log interval (issue 20):

    python bench/insight_overhead.py [--rounds 6]

runs this file as a 2-process CPU job (`dtrain launch ... --cpu --nproc 2`) `2 x rounds` times,
with torch's Flight Recorder on (dtrain's default) and off (`TORCH_FR_BUFFER_SIZE=0`), in ABBA
order. Each job measures, paired inside the job where the part can be switched off there:

- per step, the training loader's timing (`TimedLoader`: two clock reads and the batch size per
  batch) against the same in-memory loader bare, alternating blocks of batches;
- per interval, the `system` row (`Monitor.row`: memory figures, one all-reduce of a few floats);
- per second, the stack watcher's look at the job's store (`store.check`), from its own thread;
- per collective, a small all-reduce, whose difference between the jobs with and without the Flight
  Recorder is its cost (the recorder is process-wide: it cannot be switched within a job).

The driver prints medians and quartiles over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCKS, BATCHES, COLLECTIVES, ROWS, CHECKS = 20, 200, 1000, 50, 200


def per_item(run, count: int) -> float:
    began = time.perf_counter()
    run(count)
    return (time.perf_counter() - began) / count


def flop_count_cost() -> float:
    """Once per run: the MNIST CNN's forward and backward of 64 samples under FlopCounterMode, less without."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
    from mnist_cnn import MNISTCNN

    model, x = MNISTCNN(), torch.randn(64, 1, 28, 28)

    def step(counted: bool) -> float:
        began = time.perf_counter()
        if counted:
            with FlopCounterMode(display=False):
                model(x).sum().backward()
        else:
            model(x).sum().backward()
        return time.perf_counter() - began

    step(False)
    return statistics.median(step(True) - step(False) for _ in range(5))


def worker() -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    from dtrain.runtime import performance, setup, stacks
    from dtrain.runtime.data import make_loader

    ctx = setup()
    data = TensorDataset(torch.randn(64 * BATCHES, 1, 28, 28), torch.randint(0, 10, (64 * BATCHES,)))
    loader = make_loader(data, 64, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device, shuffle=True, seed=0,
                         train=True)
    loader.set_epoch(0)
    timed = performance.timed(loader, performance.StepClock())

    def batches(source):
        return lambda count: [None for _, _ in zip(range(count), source)]

    loader_diffs = []
    for block in range(BLOCKS):
        order = [(batches(timed), 1), (batches(loader), -1)]
        loader_diffs.append(sum(sign * per_item(run, BATCHES) for run, sign in (order if block % 2 else order[::-1])))
    ctx.barrier()
    row = per_item(lambda n: [ctx.monitor.row() for _ in range(n)], ROWS)
    store = dist.distributed_c10d._get_default_store()
    check = per_item(lambda n: [store.check([stacks.DUMP_KEY]) for _ in range(n)], CHECKS)
    tensor = torch.ones(16)
    ctx.barrier()
    collective = per_item(lambda n: [dist.all_reduce(tensor) for _ in range(n)], COLLECTIVES)
    if ctx.is_main:
        print(json.dumps({"loader": statistics.median(loader_diffs), "row": row, "check_per_s": check / stacks.POLL_S,
                          "collective": collective, "flop_count": flop_count_cost()}))
    ctx.close()


def driver(rounds: int) -> None:
    results: dict[str, list[float]] = {"loader timing, per step": [], "system row, per interval": [],
                                       "store check, per second": [], "FLOP count, once": [],
                                       "Flight Recorder, per collective": [], "all-reduce of 16 floats": []}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(rounds):
            collective = {}
            for recorder in ([True, False] if round_ % 2 == 0 else [False, True]):
                env = {k: v for k, v in os.environ.items() if k != "TORCH_FR_BUFFER_SIZE"}
                if not recorder:
                    env["TORCH_FR_BUFFER_SIZE"] = "0"
                out = subprocess.run(["dtrain", "launch", __file__, "--cpu", "--nproc", "2", "--wandb", "disabled",
                                      "--run-dir", f"{folder}/r{round_}{recorder}"], env=env, capture_output=True,
                                     text=True, check=True)
                measured = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
                collective[recorder] = measured["collective"]
                if recorder:
                    results["loader timing, per step"].append(measured["loader"])
                    results["system row, per interval"].append(measured["row"])
                    results["store check, per second"].append(measured["check_per_s"])
                    results["FLOP count, once"].append(measured["flop_count"])
                    results["all-reduce of 16 floats"].append(measured["collective"])
            results["Flight Recorder, per collective"].append(collective[True] - collective[False])
    print(f"{rounds} rounds of 2 jobs (Flight Recorder on, off), 2 CPU processes each")
    for name, values in results.items():
        q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        print(f"  {name:34s} median {median * 1e6:8.1f} us  (quartiles {q1 * 1e6:.1f} .. {q3 * 1e6:.1f})")


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker()
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--rounds", type=int, default=6)
        driver(parser.parse_args().rounds)

