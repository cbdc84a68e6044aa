"""Activation checkpointing: chosen blocks keep only their input and recompute the rest in backward.

Blocks are named by class (`--activation-checkpointing TransformerEncoderLayer`), or left to
the recipe, which declares its blocks in `ctx.prepare(..., blocks=...)`. Wrapping happens
before DDP/FSDP, with non-reentrant checkpointing, which works under both.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from dtrain.errors import UsageError


def class_name(module: nn.Module) -> str:
    """A module's class name; a checkpointed block answers with the name of the block it wraps."""
    if isinstance(module, CheckpointWrapper):
        return class_name(module._checkpoint_wrapped_module)
    return type(module).__name__


def blocks_of(model: nn.Module, class_names: tuple[str, ...]) -> list[nn.Module]:
    """The modules of `model` of those classes (outermost first), their checkpoint wrapper where they have one."""
    wrapped = {id(m._checkpoint_wrapped_module) for m in model.modules() if isinstance(m, CheckpointWrapper)}
    return [m for m in model.modules() if class_name(m) in class_names and id(m) not in wrapped]


def checkpointed_classes(requested: str, recipe_blocks: tuple[str, ...], model: nn.Module) -> tuple[str, ...]:
    """The class names `--activation-checkpointing` asks for, checked against the model."""
    if requested == "auto":
        if not recipe_blocks:
            raise UsageError("--activation-checkpointing without class names needs a recipe that declares its blocks "
                             "(ctx.prepare(..., blocks=[...])); name them: --activation-checkpointing ClassName.")
        return recipe_blocks
    names = tuple(n for n in requested.split(",") if n)
    present = sorted({class_name(m) for m in model.modules()})
    unknown = [n for n in names if n not in present]
    if unknown:
        raise UsageError(f"--activation-checkpointing names {', '.join(unknown)}, but the model has no module of "
                         f"that class; its classes are {', '.join(present)}.")
    return names


def apply(model: nn.Module, class_names: tuple[str, ...]) -> None:
    """Wrap every module of those classes in non-reentrant activation checkpointing, in place."""
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: type(module).__name__ in class_names)
