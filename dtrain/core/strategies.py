"""The strategies: what the launch side knows of each, without torch, in one registry.

Each row describes a strategy and names its runtime implementation (a `StrategyRuntime` in
`dtrain.runtime.strategies`, which wraps the model and owns backward, the step, and what a
checkpoint holds). Nothing else in dtrain tests a strategy's name: a new strategy is its runtime
module plus one row here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dtrain.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    runtime: str  # "module:Class" of its implementation, imported by the workers only
    package: str | None = None  # what must be installed to use it
    group_of_one: bool = False  # a world of one still needs a process group
    async_checkpoint: bool = True  # DCP can save its state in the background
    loss_scaling: str = "amp"  # fp16's loss scaler: GradScaler ("amp"), ShardedGradScaler ("sharded"), or the engine's
    cpu_precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    deepspeed_stage: int | None = None  # a DeepSpeed ZeRO stage: it takes a DeepSpeed config
    cuda_graph: bool = False  # a model it wraps can be captured in CUDA graphs (--cuda-graph): no hooks of its own


def _zero(stage: int) -> Strategy:
    return Strategy(f"zero{stage}", "dtrain.runtime.strategies.zero:DeepSpeedZero", package="deepspeed",
                    group_of_one=True, async_checkpoint=False, loss_scaling="engine", cpu_precisions=("fp32", "bf16"),
                    deepspeed_stage=stage)


STRATEGIES = {s.name: s for s in (
    Strategy("ddp", "dtrain.runtime.strategies.ddp:DataParallel", cuda_graph=True),
    Strategy("fsdp", "dtrain.runtime.strategies.fsdp:FullyShardedDataParallel", loss_scaling="sharded"),
    _zero(1),
    _zero(2),
    _zero(3),
)}


def get(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UsageError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}.") from None


def names_where(test: Callable[[Strategy], bool]) -> str:
    """The strategies that pass `test`, as a sentence lists them: "zero1, zero2 or zero3"."""
    names = [s.name for s in STRATEGIES.values() if test(s)]
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1])))
