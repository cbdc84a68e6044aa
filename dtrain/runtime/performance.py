"""Where each rank's time goes, what its memory holds, and the FLOP/s it achieves: one `system` row
of metrics.jsonl per log interval (never per step), from one small all-reduce.

Under DDP every rank's wall-clock step is the same (the fast ones wait for the slow one in the
gradient all-reduce), so wall time names no straggler. A rank's step is split instead into the
time it waited for data (the training loader's `next`), the time it waited in collectives (dtrain's
shared-memory gradient all-reduce, `ctx.all_reduce`) and the rest, its compute: the slowest rank is
the one that computed longest. On GPUs the gradient all-reduce runs on a stream of its own and its
wait is not seen from the host: there it stays in the compute time.

FLOPs are counted once, by `torch.utils.flop_counter` around the first step's forward and backward
(they run as usual), per sample of that batch; TFLOP/s and MFU follow from the samples each rank
trained per second, MFU only against a known peak (`dtrain.core.hardware.peak_tflops` or --peak-tflops).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from dtrain.runtime import dist as dist_utils
from dtrain.runtime.data import batch_size_of

GB = 1e9


def own_waits() -> float:
    """Seconds this rank has waited so far in dtrain's own collectives (`dist.count_own_collective`)."""
    return sum(collective.waited_s for collective in dist_utils.own_collectives())


def timed(loader, clock: StepClock):
    """`loader` with its `next` timed (data wait) and its samples counted; sized if it is."""
    return SizedTimedLoader(loader, clock) if hasattr(loader, "__len__") else TimedLoader(loader, clock)


class TimedLoader:
    """A training loader whose `next` is timed (data wait) and whose samples are counted."""

    def __init__(self, loader, clock: StepClock):
        self._loader, self._clock = loader, clock

    def __iter__(self):
        return self._timed(iter(self._loader))  # the inner iterator now: making it may draw random numbers

    def _timed(self, batches):
        while True:
            began = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self._clock.data_s += time.perf_counter() - began
            self._clock.last_batch_size = batch_size_of(batch)
            self._clock.samples += self._clock.last_batch_size
            yield batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class SizedTimedLoader(TimedLoader):
    def __len__(self) -> int:
        return len(self._loader)


class StepClock:
    """This rank's interval since the last `system` row: steps, samples, data and collective waits."""

    def __init__(self, waited: Callable[[], float] = own_waits):
        self._waited = waited
        self.last_batch_size = 0
        self.restart()

    def restart(self) -> None:
        self.data_s = self.comm_s = 0.0
        self.samples = self.steps = 0
        self.began = time.perf_counter()
        self._waited_before = self._waited()

    def measure(self) -> list[float]:
        """[seconds per step: compute, data wait, collective wait; samples per second] of this interval."""
        wall = time.perf_counter() - self.began
        comm = self.comm_s + self._waited() - self._waited_before
        steps = max(self.steps, 1)
        return [max(wall - self.data_s - comm, 0.0) / steps, self.data_s / steps, comm / steps,
                self.samples / wall if wall > 0 else 0.0]


class FlopCount:
    """FLOPs per sample of the model's training step, counted around the first step's forward and backward."""

    def __init__(self) -> None:
        self.per_sample: float | None = None
        self._mode: FlopCounterMode | None = None
        self._done = False

    def start(self) -> None:
        if not self._done and self._mode is None:
            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()

    def stop(self, batch_size: int) -> bool:
        """After the first backward: whether the count ended here."""
        if self._mode is None:
            return False
        self._mode.__exit__(None, None, None)
        if batch_size:
            self.per_sample = self._mode.get_total_flops() / batch_size
        self._mode, self._done = None, True
        return self.per_sample is not None


def memory(device: torch.device) -> list[float]:
    """[GB allocated at most, GB reserved at most, allocator retries, OOMs] on a GPU since the process
    began, or [resident GB, peak resident GB, 0, 0] of this process on CPU: the row at `ctx.close()`
    holds the run's peaks."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return [torch.cuda.max_memory_allocated(device) / GB, torch.cuda.max_memory_reserved(device) / GB,
                float(stats.get("num_alloc_retries", 0)), float(stats.get("num_ooms", 0))]
    with open("/proc/self/statm") as fh:
        resident = int(fh.read().split()[1]) * resource.getpagesize()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return [resident / GB, peak_kb * 1024 / GB, 0.0, 0.0]


def gather(values: list[float], rank: int, world_size: int, device: torch.device) -> list[list[float]]:
    """Every rank's `values`, in rank order: each rank fills its row of a small matrix, one all-reduce sums them
    (the same call on every torch and backend dtrain supports)."""
    everyone = torch.zeros(world_size, len(values), dtype=torch.float64, device=device)
    everyone[rank] = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(everyone)
    return everyone.tolist()


def system_row(ranks: list[list[float]], device_type: str, flops_per_sample: float | None,
               peak_tflops: float | None) -> tuple[dict[str, float], str | None]:
    """The `system` row from every rank's [compute, data, comm per step, samples/s, 4 memory figures],
    and a warning when the MFU would exceed 100% (the peak is wrong: none is logged then)."""
    columns = list(zip(*ranks))
    row: dict[str, float] = {}
    for index, name in enumerate(("compute_s", "data_wait_s", "comm_wait_s")):
        row.update({f"{name}/min": min(columns[index]), f"{name}/median": statistics.median(columns[index]),
                    f"{name}/max": max(columns[index])})
    row["slowest_rank"] = max(range(len(ranks)), key=lambda rank: ranks[rank][0])
    if device_type == "cuda":
        row.update({"memory/max_allocated_gb": max(columns[4]), "memory/max_reserved_gb": max(columns[5]),
                    "memory/alloc_retries": sum(columns[6]), "memory/ooms": sum(columns[7])})
    else:
        row.update({"memory/rss_gb": max(columns[4]), "memory/peak_rss_gb": max(columns[5])})
    warning = None
    if flops_per_sample and any(columns[3]):
        row["tflops"] = flops_per_sample * statistics.fmean(columns[3]) / 1e12
        if peak_tflops:
            mfu = row["tflops"] / peak_tflops
            if mfu <= 1.0:
                row["mfu"] = mfu
            else:
                warning = (f"{row['tflops']:.3g} TFLOP/s per device exceed the peak of {peak_tflops:g}; MFU is not "
                           "logged: give the device's dense peak for this precision with --peak-tflops.")
    return row, warning


class Monitor:
    """The interval's clock, the FLOP count and the peak; `due` rows every `every` steps."""

    def __init__(self, device: torch.device, rank: int, world_size: int, peak_tflops: float | None):
        self.device, self.rank, self.world_size, self.peak_tflops = device, rank, world_size, peak_tflops
        self.clock = StepClock()
        self.flops = FlopCount()
        self._warned = False

    def row(self) -> tuple[dict[str, float], str | None]:
        """Collective: this interval's `system` row (on every rank) and a warning to give once, then a new
        interval."""
        ranks = gather(self.clock.measure() + memory(self.device), self.rank, self.world_size, self.device)
        row, warning = system_row(ranks, self.device.type, self.flops.per_sample, self.peak_tflops)
        self.clock.restart()
        if self._warned:
            return row, None
        self._warned = warning is not None
        return row, warning
