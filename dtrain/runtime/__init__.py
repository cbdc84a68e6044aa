"""The worker side of dtrain, imported by recipes inside every process."""

from dtrain.runtime.context import Context, setup
from dtrain.runtime.trainer import Trainer

__all__ = ["Context", "Trainer", "setup"]
