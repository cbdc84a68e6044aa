"""The strategies' runtime implementations; `dtrain.core.strategies` is their registry."""

from __future__ import annotations

import importlib

import torch

from dtrain.core import strategies
from dtrain.core.contract import WorkerEnv
from dtrain.runtime.strategies.base import StrategyRuntime


def runtime_class(name: str) -> type[StrategyRuntime]:
    module, _, attribute = strategies.get(name).runtime.partition(":")
    return getattr(importlib.import_module(module), attribute)


def make_strategy(env: WorkerEnv, device: torch.device) -> StrategyRuntime:
    return runtime_class(env.strategy)(strategies.get(env.strategy), env, device)
