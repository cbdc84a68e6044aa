"""SkyPilot, an engine with the worker face only: SkyPilot starts a task's command on every VM of its cluster, with
the VM's place in the environment; `dtrain launch` there takes it. Submitting is SkyPilot's own (`sky launch`), so
dtrain has no `skypilot` commands. The only module that names SkyPilot's variables.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from dtrain.core.contract import Job
from dtrain.core.spec import DEFAULT_MASTER_PORT
from dtrain.engines import Allocation

NAME = "skypilot"


def _task(environ: Mapping[str, str]) -> str:
    """The task's id, the same on every VM (it names the rendezvous and the run), as a run name may spell it."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", environ.get("SKYPILOT_TASK_ID") or NAME)


def allocation(environ: Mapping[str, str]) -> Allocation | None:
    """`SKYPILOT_NODE_IPS` lists the VMs' addresses one per line, the head (node rank 0) first."""
    ips = environ.get("SKYPILOT_NODE_IPS", "").split()
    if not ips or not environ.get("SKYPILOT_NODE_RANK"):
        return None
    return Allocation(engine=NAME, job_id=_task(environ), nodes=int(environ.get("SKYPILOT_NUM_NODES") or len(ips)),
                      node_rank=int(environ["SKYPILOT_NODE_RANK"]), first_host=ips[0], master_port=DEFAULT_MASTER_PORT)


@dataclasses.dataclass(frozen=True)
class SkyPilot:
    name: str = NAME
    requeues: bool = False  # a managed job recovers its VMs and starts the task again itself

    def job(self, environ: Mapping[str, str]) -> Job | None:
        return Job(engine=NAME, job_id=_task(environ)) if environ.get("SKYPILOT_NODE_RANK") else None

    def allocation(self, environ: Mapping[str, str]) -> Allocation | None:
        return allocation(environ)

    def requeue(self, job_id: str) -> None:
        raise NotImplementedError("a SkyPilot managed job recovers its VMs and starts the task again itself")


ENGINE = SkyPilot()
