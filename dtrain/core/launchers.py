"""The launchers' registry: one row per real program that starts a job's processes.

The rows are what both sides may know of a launcher (its name, whether it restarts, what it needs
installed); the module a row names, under `dtrain.launch.launchers`, renders a spec into its command.
A new launcher is its module plus one row here.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from dtrain.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Launcher:
    name: str
    module: str  # the module that renders it
    package: str | None  # what must be installed to use it
    rank_prefixes: bool  # each worker's line reaches dtrain tagged with its rank ("[rank3]: ...")
    restarts: bool  # can restart the workers (--max-restarts)
    elastic: bool = False  # can restart them on fewer nodes (--min-nodes)
    one_node: bool = False  # starts the processes of one node only
    agent: bool = True  # a process of its own starts the workers; without one, the worker is dtrain's child

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)


LAUNCHERS = {launcher.name: launcher for launcher in (
    Launcher("torchrun", "dtrain.launch.launchers.torchrun", package=None, rank_prefixes=True, restarts=True,
             elastic=True),
    Launcher("accelerate", "dtrain.launch.launchers.accelerate", package="accelerate", rank_prefixes=True, restarts=True),
    Launcher("deepspeed", "dtrain.launch.launchers.deepspeed", package="deepspeed", rank_prefixes=False, restarts=False),
    Launcher("local", "dtrain.launch.launchers.local", package=None, rank_prefixes=True, restarts=False, one_node=True),
    Launcher("direct", "dtrain.launch.launchers.direct", package=None, rank_prefixes=False, restarts=False, one_node=True,
             agent=False),
)}
# What a job on one node without restarts uses unless --launcher says otherwise: no launcher for one process,
# dtrain's own agent for more; torchrun otherwise.
DIRECT, LOCAL, TORCHRUN = "direct", "local", "torchrun"


def get(name: str) -> Launcher:
    try:
        return LAUNCHERS[name]
    except KeyError:
        raise UsageError(f"unknown launcher {name!r}; use one of {', '.join(LAUNCHERS)}.") from None
