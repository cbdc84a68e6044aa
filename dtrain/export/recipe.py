"""A recipe's export face (docs/deploy.md): the module-level functions `dtrain export` calls, with the recipe's
arguments as the run recorded them in config.yaml.

    parse_args(argv) -> Namespace          the recipe's own parser (export passes the recorded argv)
    export_model(args) -> nn.Module        the model as the recipe builds it, before training
    export_inputs(args) -> {name: Tensor}  one batch of forward's keyword arguments: traced, and checked on
    export_dims(args) -> {name: {axis: (dim_name, min, max)}}   optional: the axes that may vary
    export_eval(args) -> ({name: Tensor}, targets)              optional: the evaluation set, for --eval
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from dtrain.errors import UsageError

Inputs = dict[str, torch.Tensor]
Dims = dict[str, dict[int, tuple[str, int, int | None]]]  # input name -> axis -> (name, min, max or None)

_REQUIRED = {
    "parse_args": "parse_args(argv) that returns the recipe's arguments",
    "export_model": "export_model(args) that builds the model",
    "export_inputs": "export_inputs(args) that gives one batch of the model's inputs as {name: tensor}",
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    path: Path
    module: ModuleType
    args: argparse.Namespace

    @classmethod
    def load(cls, path: Path, argv: list[str]) -> Recipe:
        """Import the recipe (its folder first on sys.path, for the modules beside it) and parse `argv`."""
        if not path.is_file():
            raise UsageError(f"recipe {path} does not exist here; pass --recipe with the recipe the run trained.")
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        missing = [what for name, what in _REQUIRED.items() if not callable(getattr(module, name, None))]
        if missing:
            raise UsageError(f"{path} cannot be exported: add a module-level {'; and '.join(missing)} "
                             "(docs/deploy.md shows the MNIST recipe's).")
        try:
            return cls(path, module, module.parse_args(argv))
        except SystemExit:  # argparse said why, above
            raise UsageError(f"{path} no longer takes the arguments the run recorded ({' '.join(argv)}); export with "
                             "the recipe as it was, through --recipe.") from None

    def model(self) -> nn.Module:
        """The model in fp32, in evaluation mode: what every artifact is compared against."""
        return self.module.export_model(self.args).float().eval()

    def inputs(self) -> Inputs:
        return self._named_tensors(self.module.export_inputs(self.args), "export_inputs")

    def dims(self, inputs: Inputs, dynamic_batch: bool) -> Dims:
        """The recipe's varying axes, and with `dynamic_batch` axis 0 of every input."""
        declared = self.module.export_dims(self.args) if hasattr(self.module, "export_dims") else {}
        batch = {name: {0: ("batch", 1, None)} for name in inputs} if dynamic_batch else {}
        return {name: {**batch.get(name, {}), **declared.get(name, {})} for name in {*declared, *batch}}

    def evaluation(self) -> tuple[Inputs, torch.Tensor]:
        if not hasattr(self.module, "export_eval"):
            raise UsageError(f"--eval needs {self.path} to define export_eval(args), which returns the evaluation "
                             "set as ({name: tensor}, integer targets); or leave --eval out.")
        inputs, targets = self.module.export_eval(self.args)
        return self._named_tensors(inputs, "export_eval"), targets

    def _named_tensors(self, value: Any, function: str) -> Inputs:
        if not (isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())):
            raise UsageError(f"{self.path}'s {function}(args) returned {type(value).__name__}; return a dict of "
                             "the model's keyword arguments to tensors, as in {'images': batch}.")
        return value
