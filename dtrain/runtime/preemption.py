"""Preemption: a signal (a cluster engine's pre-timeout signal) makes every rank checkpoint at the same step.

The signal may reach ranks at different steps, or only some of them, so no rank acts on it
alone: every `CHECK_EVERY` steps the ranks all-reduce their flags (one scalar; no host sync on
the other steps) and all see the same answer. After the checkpoint, rank 0 requeues the cluster
job (at most --max-requeues times) and every rank exits.
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist

from dtrain import engines
from dtrain.core.contract import WorkerEnv
from dtrain.errors import UsageError

CHECK_EVERY = 10


class Preemption:
    def __init__(self, env: WorkerEnv, device: torch.device):
        self.env = env
        self.device = device
        self.signum = getattr(signal, f"SIG{env.preempt_signal}")
        self.received = False
        self.agreed = False

    def install(self) -> None:
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if not self.received:
            print(f"rank {self.env.rank}: got SIG{self.env.preempt_signal}; checkpointing within {CHECK_EVERY} steps",
                  file=sys.stderr, flush=True)
        self.received = True

    def due(self, step: int) -> bool:
        """Collective on every CHECK_EVERY-th step: True on all ranks once any rank got the signal."""
        if self.agreed:
            return True
        if self.env.world_size == 1:
            self.agreed = self.received
        elif step % CHECK_EVERY == 0:
            flag = torch.tensor(float(self.received), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.agreed = bool(flag.item())
        return self.agreed

    def stop_and_requeue(self, step: int) -> None:
        """Rank 0, once the checkpoint is committed: say so, and requeue the cluster job if allowed.

        The engine stops this job's processes as soon as the requeue is accepted, so the line comes first.
        """
        engine, job, count, limit = self.env.engine, self.env.job_id, self.env.requeue_count, self.env.max_requeues
        done = f"dtrain: stopped at step {step} on SIG{self.env.preempt_signal} with a checkpoint"
        if engine is None or job is None:
            print(f"{done}; not in a cluster job, so run the same command again to resume.", flush=True)
        elif count >= limit:
            print(f"{done}; {engine} job {job} has been requeued {count} times, the limit (--max-requeues {limit}), "
                  "so it is not requeued.", flush=True)
        elif not engines.get(engine).requeues:
            print(f"{done}; {engine} starts job {job} again itself, and it resumes from there.", flush=True)
        else:
            print(f"{done}; requeueing {engine} job {job} (requeue {count + 1} of {limit}).", flush=True)
            try:
                engines.get(engine).requeue(job)
            except UsageError as exc:
                print(f"dtrain: could not requeue {engine} job {job}: {exc}", file=sys.stderr, flush=True)
