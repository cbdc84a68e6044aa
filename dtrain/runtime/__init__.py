"""The worker side of dtrain, imported by recipes inside every process."""

from dtrain.runtime.checkpoint import TrainState
from dtrain.runtime.context import Context, setup
from dtrain.runtime.data import TensorDictDataset
from dtrain.runtime.trainer import Trainer

__all__ = ["Context", "TensorDictDataset", "TrainState", "Trainer", "setup"]
