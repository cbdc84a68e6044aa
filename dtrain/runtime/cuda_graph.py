"""--cuda-graph: the model's forward and backward replayed from CUDA graphs.

The step of a small model on a fast GPU is bound by launching kernels, not by running them (the
MNIST CNN at batch 64 on an H200: about 2 ms a step). `torch.cuda.make_graphed_callables`
records the forward and the backward once each and replays each with one launch. The loss, the
optimizer and the learning-rate schedule stay eager, so every optimizer and schedule works as
before (a graph would freeze a learning rate held as a Python number).

The graph is recorded at the second training call (the first one's FLOPs are counted, eagerly),
for that call's input shapes; calls with other shapes (an epoch's last, partial batch) and calls
in eval mode run the module's own forward. Where this is correct is decided on the launch side
(`dtrain.core.spec`): one GPU process, a strategy without hooks of its own, no activation checkpointing.
A replay's outputs live in the graph's memory until the next replay. Its parameter gradients do
too, and autograd would take such a buffer as `.grad` itself, which the next replay then overwrites
(pytorch/pytorch#181723: gradients summed over micro-batches come out wrong, silently): each is
copied out first, one small kernel per parameter, so any loop's accumulation stays correct.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dtrain.errors import UsageError

RECORD_AT_CALL = 2


def _shapes(args: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((a.shape, a.dtype, a.requires_grad) for a in args)


class GraphedForward:
    """Takes the place of `module.forward`: eager until recorded, then the graph for the shapes it was recorded with."""

    def __init__(self, module: nn.Module):
        if getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod"):
            raise UsageError("--cuda-graph records the model's own forward, and this model is compiled (torch.compile); "
                             "torch.compile(mode='reduce-overhead') records CUDA graphs itself: use one of the two.")
        self.module = module
        self.eager = module.forward
        self.graphed: Callable[..., Any] | None = None
        self.shapes: tuple | None = None
        self.calls = 0
        module.forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.module.training:
            return self.eager(*args, **kwargs)
        if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
            given = ", ".join([type(a).__name__ for a in args] + [f"{k}=" for k in kwargs])
            raise UsageError(f"--cuda-graph records model(tensor, ...) calls, and this model is called with ({given}); "
                             "call it with tensors as positional arguments, or leave --cuda-graph out.")
        if self.graphed is None:
            self.calls += 1
            if self.calls < RECORD_AT_CALL:
                return self.eager(*args)
            self.record(args)
        return self.graphed(*args) if self.graphed is not None and _shapes(args) == self.shapes else self.eager(*args)

    def record(self, args: tuple[torch.Tensor, ...]) -> None:
        samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)  # the graph's own inputs
        del self.module.forward  # make_graphed_callables wraps the module's own forward
        try:
            torch.cuda.make_graphed_callables(self.module, samples, allow_unused_input=True)
        except (RuntimeError, AssertionError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--cuda-graph could not record this model's forward and backward ({reason}); a model "
                             "that reads values back to the host, or has hooks, runs without --cuda-graph.") from None
        self.graphed, self.shapes = self.module.forward, _shapes(args)
        self.module.forward = self
        for param in self.module.parameters():
            if param.requires_grad:
                param.register_hook(torch.Tensor.clone)  # out of the graph's buffer, before autograd keeps it

