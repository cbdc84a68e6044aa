"""The strategies' runtime implementations; `dtrain.core.strategies` is their registry."""

from __future__ import annotations

import importlib

import torch

from dtrain.core import strategies
from dtrain.core.contract import WorkerEnv
from dtrain.runtime.strategies.base import StrategyRuntime


def make_strategy(env: WorkerEnv, device: torch.device) -> StrategyRuntime:
    description = strategies.get(env.strategy)
    module, _, name = description.runtime.partition(":")
    return getattr(importlib.import_module(module), name)(description, env, device)
