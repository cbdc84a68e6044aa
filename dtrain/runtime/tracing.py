"""--trace: torch.profiler over a window of steps on the chosen ranks, one Chrome trace per rank
(`traces/rank<R>.json`, for chrome://tracing or Perfetto), and on request a CUDA memory snapshot of
the same steps. The window counts `ctx.step()` calls: WAIT skipped, WARMUP traced and dropped,
ACTIVE kept."""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from dtrain.core.contract import WorkerEnv
from dtrain.core.options import parse_trace
from dtrain.core.rundir import RunDir

MEMORY_EVENTS = 100_000


class Tracer:
    def __init__(self, env: WorkerEnv, device: torch.device):
        self.profiler: profile | None = None
        if env.trace is None or str(env.rank) not in (env.trace_ranks or ("0",)):
            return
        if env.memory_snapshot and device.type != "cuda":
            print("dtrain: --memory-snapshot records CUDA memory, and this rank runs on CPU: --trace alone traces it.",
                  file=sys.stderr, flush=True)
        self.folder = RunDir.of(env.run_dir).traces
        self.rank = env.rank
        self.memory = env.memory_snapshot and device.type == "cuda"
        wait, warmup, active = parse_trace(env.trace)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiler = profile(activities=activities, on_trace_ready=self._write,
                                schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1))
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_EVENTS)
        self.profiler.start()

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def _write(self, profiler: profile) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.folder / f"rank{self.rank}.json"))
        if self.memory:
            torch.cuda.memory._dump_snapshot(str(self.folder / f"memory-rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory = False

    def close(self) -> None:
        """Stop the profiler (a window not reached by the end of training writes nothing)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
