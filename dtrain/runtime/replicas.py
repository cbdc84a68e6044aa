"""Replica groups (--replica-groups R): torchft's fault-tolerant data parallelism between groups.

Each group is its own `dtrain launch` (one process, its own run directory) that joins torchft's lighthouse.
Every step the groups that are alive form a quorum and average their gradients; a group that dies drops out
of the quorum and the others keep stepping; a group that starts again (its launcher's --max-restarts, or a
new launch) receives a live peer's model, optimizer and schedule over the process group and goes on from the
peer's step, without reading a checkpoint. A step during which a peer died is dropped on every group: no
optimizer step, the next batch. torchft is imported only here, and only by a run that asks for it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from dtrain.core.contract import NETWORK_INTERFACES, WorkerEnv
from dtrain.core.hardware import route_to
from dtrain.errors import UsageError

LIGHTHOUSE_WAIT_S = 60  # how long a group waits for the lighthouse to answer (it may start after the groups)


def check(env: WorkerEnv) -> None:
    """What replica groups need, said before anything starts."""
    if env.world_size != 1:
        raise UsageError(f"--replica-groups runs one process per replica group, and this group has {env.world_size}; "
                         "start each group with one process (--nproc 1 or --gpus 1, one node), or leave "
                         "--replica-groups out.")
    if env.strategy != "ddp":
        raise UsageError(f"--replica-groups averages gradients between groups like DDP, not --strategy {env.strategy}; "
                         "pass --strategy ddp, or leave --replica-groups out.")
    if env.grad_accum > 1:
        raise UsageError("--replica-groups averages every micro-batch's gradients between groups; leave --grad-accum "
                         "out, or --replica-groups.")
    if env.replica_group >= env.replica_groups:
        raise UsageError(f"--replica-group must be between 0 and {env.replica_groups - 1} for --replica-groups "
                         f"{env.replica_groups}, got {env.replica_group}.")


class Replicas:
    """This group's torchft Manager: the quorum at the start of each step, the commit at its end, the heal."""

    def __init__(self, env: WorkerEnv, device: torch.device, state_dict: Callable[[], dict[str, Any]],
                 load_state_dict: Callable[[dict[str, Any]], None]):
        """`setup()` has checked `env` (`check`)."""
        os.environ.setdefault("RUST_LOG", "warn")  # torchft's server logs every quorum at info
        logging.getLogger("torchft").setLevel(logging.CRITICAL)  # a peer's failure: `dropped` says it in one line
        try:
            from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL
            from torchft.checkpointing.pg_transport import PGTransport
        except ImportError:
            raise UsageError("--replica-groups needs torchft, which is not installed here; pip install "
                             "'dtrain[ft]', or leave --replica-groups out.") from None
        lighthouse = env.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")
        if not lighthouse:
            raise UsageError("--replica-groups needs torchft's lighthouse, which joins the groups; start one "
                             "(`torchft_lighthouse --min_replicas 1`) and pass --lighthouse http://HOST:29510.")
        route = route_to(urlparse(lighthouse).hostname or "")  # the other groups reach this one the way it reaches
        address = route[0] if route else "127.0.0.1"           # the lighthouse: advertised, and gloo's and NCCL's
        if route:
            for variable in NETWORK_INTERFACES:
                os.environ.setdefault(variable, route[1])
        timeout = timedelta(seconds=env.timeout)
        group = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        self._store = torch.distributed.TCPStore(address, 0, is_master=True, wait_for_workers=False)
        wait = min(env.timeout, LIGHTHOUSE_WAIT_S)
        try:
            self.manager = Manager(pg=group, min_replica_size=1, state_dict=state_dict, load_state_dict=load_state_dict,
                                   replica_id=f"group{env.replica_group}", lighthouse_addr=lighthouse,
                                   hostname=address, store_addr=address, store_port=self._store.port, rank=0,
                                   world_size=1, timeout=timeout, quorum_timeout=timeout,
                                   connect_timeout=timedelta(seconds=wait),
                                   checkpoint_transport=PGTransport(group, timeout=timeout, device=device))
        except RuntimeError as exc:
            if "failed to connect" not in str(exc):
                raise
            raise UsageError(f"--replica-groups could not reach the lighthouse {lighthouse} within {wait} s; start "
                             "it where every group reaches it (`torchft_lighthouse --min_replicas 1 --bind "
                             "HOST:PORT`), or fix --lighthouse.") from None
        self._asked: float | None = None  # when this step's quorum was asked for

    def average(self, model: nn.Module) -> None:
        """Average the gradients between the groups of this step's quorum, as one flat buffer (after the backward,
        where DDP does it). A group that is healing sends zeros and is not counted."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        self.manager.allreduce(flat).wait()
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)

    def begin(self) -> float:
        """Ask for this step's quorum (once per step; it forms while the forward runs); when it was asked for."""
        if self._asked is None:
            self._asked = time.time()
            self.manager.start_quorum()
        return self._asked

    def commit(self, steps: int) -> tuple[int | None, dict[str, Any] | None]:
        """Before the optimizer step: the step count to go on from (None: the step is dropped, a peer failed
        during it), and the `heal` row's values when this step took a peer's state."""
        asked = self.begin()
        self._asked = None
        if not self.manager.should_commit():
            return None, None
        now = self.manager.current_step()
        if now == steps + 1:
            return now, None
        return now, {"previous_step": steps, "peer_heal_s": round(time.time() - asked, 3),
                     "participants": self.manager.num_participants()}

    def dropped(self) -> str:
        """Why this step was dropped, in a few words."""
        error = self.manager.errored()
        cause = error.original_exception if error is not None else None
        return str(cause).split(". ")[0] if cause is not None else "the quorum did not commit it"

    def resumed(self, step: int) -> None:
        """A checkpoint's step, before the first quorum: the lighthouse heals the groups behind it."""
        self.manager.load_state_dict({"step": step, "batches_committed": step})

    def close(self) -> None:
        self.manager.shutdown(wait=False)
