"""DeepSpeed ZeRO stage 1-3 through `deepspeed.initialize`, with the recipe's own optimizer.

The engine owns backward (loss scaling, averaging over the accumulation window), the step, and
its checkpoint files; the gradient norm is the one the step computed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtrain.core import deepspeed_config
from dtrain.core.rundir import fsync_dir
from dtrain.errors import UsageError
from dtrain.runtime.checkpoint import CheckpointError, fsync_file
from dtrain.runtime.precision import Precision
from dtrain.runtime.shared_memory import SHM_DIR
from dtrain.runtime.strategies.base import StrategyRuntime, make_parameters_contiguous

DeepSpeedEngine = Any  # what deepspeed.initialize returns: an nn.Module with methods of its own (backward, step)

ENGINE_FOLDER = "deepspeed"  # where in a checkpoint the engine writes its own files (its "tag")
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch's switch: weights_only=True whatever the caller passes
# DeepSpeed's own use of a torch API that torch now deprecates: not the recipe's to act on.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning)


class DeepSpeedZero(StrategyRuntime):
    sharded = True
    _norm_to_fill: torch.Tensor | None = None  # what ctx.clip_grad_norm returned, until the step measures it

    def wrap(self, model: nn.Module, block_classes: tuple[str, ...], optimizers: Sequence[torch.optim.Optimizer],
             batch_size: int | None) -> nn.Module:
        import deepspeed

        if len(optimizers) != 1:
            raise UsageError(f"--strategy {self.name} needs exactly one optimizer passed to ctx.prepare "
                             f"(got {len(optimizers)}).")
        settings = self.deepspeed_config(batch_size)
        model = model.to(self.device)
        make_parameters_contiguous(model)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizers[0], config=settings,
                                               dist_init_required=False)
        self.unlink_shared_memory()
        return engine

    def unlink_shared_memory(self) -> None:
        """DeepSpeed's CPU all-reduce maps one /dev/shm file per rank when all ranks share a host
        (LOCAL_SIZE, set by its launcher) and never removes them: 69 MB per rank per run, kept in
        memory until reboot. Once every rank has mapped every file (`initialize` waits for that;
        the barrier for the slowest), each rank unlinks its own: the mappings stay, the names go."""
        torch.distributed.barrier()
        name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
               f"{os.environ.get('MASTER_PORT', '')}_{self.env.rank}"
        Path(SHM_DIR, name).unlink(missing_ok=True)

    def deepspeed_config(self, batch_size: int | None) -> dict[str, Any]:
        """The launch's merged JSON (or, under plain torchrun, the default one) with the recipe's batch size."""
        stage = self.description.deepspeed_stage or 0  # a ZeRO strategy's row names its stage
        if self.env.deepspeed_config:
            with open(self.env.deepspeed_config) as fh:
                settings = json.load(fh)
        else:
            settings = deepspeed_config.merge(deepspeed_config.default(stage), stage, self.env.precision,
                                              self.env.grad_accum, f"dtrain's zero{stage}.json")
        micro = settings.get("train_micro_batch_size_per_gpu", "auto")
        if micro == "auto":
            micro = batch_size or 1
        elif batch_size is not None and micro != batch_size:
            raise UsageError(f"the DeepSpeed config sets train_micro_batch_size_per_gpu {micro}, but the recipe's "
                             f"batch size is {batch_size}; make them agree (or set it to \"auto\").")
        total = micro * self.env.grad_accum * self.env.world_size
        if settings.get("train_batch_size", "auto") not in ("auto", total):
            raise UsageError(f"the DeepSpeed config sets train_batch_size {settings['train_batch_size']}, but "
                             f"{micro} per process x {self.env.grad_accum} accumulation x {self.env.world_size} "
                             f"processes is {total}; make them agree (or set it to \"auto\").")
        return {**settings, "train_micro_batch_size_per_gpu": micro, "train_batch_size": total}

    def set_gradient_sync(self, model: DeepSpeedEngine, enabled: bool) -> None:
        model.set_gradient_accumulation_boundary(enabled)

    def backward(self, model: DeepSpeedEngine, loss: torch.Tensor, precision: Precision, grad_accum: int) -> None:
        model.backward(loss)

    def clip_grad_norm(self, model: DeepSpeedEngine, optimizers: Sequence[torch.optim.Optimizer], precision: Precision,
                       max_norm: float) -> torch.Tensor:
        """ZeRO's optimizers clip inside the step, by the value they hold: the recipe's goes there now. The
        total norm (before clipping, as DDP's) is the one that step measures: the tensor returned here
        receives it when `ctx.step()` has run."""
        model.optimizer.clip_grad = float(max_norm)
        self._norm_to_fill = torch.full((), float("nan"))
        return self._norm_to_fill

    def step(self, model: DeepSpeedEngine, optimizers: Sequence[torch.optim.Optimizer], precision: Precision,
             measure_grad_norm: bool, is_main: bool) -> torch.Tensor | None:
        model.step()
        measured = model.get_global_grad_norm()  # None when the step was skipped (an fp16 overflow)
        norm = torch.as_tensor(float("nan") if measured is None else float(measured))
        if self._norm_to_fill is not None:
            self._norm_to_fill.copy_(norm)
            self._norm_to_fill = None
        return norm if measure_grad_norm and is_main else None

    def unwrap(self, model: DeepSpeedEngine) -> nn.Module:
        return model.module if hasattr(model, "module") else model

    def close(self, model: DeepSpeedEngine) -> None:
        """Without this, ZeRO-3 processes sometimes abort at exit (SIGABRT) after all work is done."""
        model.destroy()

    def full_state_dict(self, model: DeepSpeedEngine) -> dict[str, torch.Tensor]:
        if self.description.deepspeed_stage == 3:
            state = model._zero3_consolidated_16bit_state_dict()  # gathered onto rank 0
        else:
            state = model.module.state_dict()
        return {k: v.detach().cpu() for k, v in (state or {}).items()}

    def checkpointable(self, model: DeepSpeedEngine, optimizers: Sequence[torch.optim.Optimizer]) -> EngineState:
        return EngineState(model, self.env.rank)

    @staticmethod
    def model_weights(folder: Path) -> dict[str, torch.Tensor]:
        """The fp32 master weights, gathered from every rank's partition by DeepSpeed's own zero_to_fp32 (any stage,
        any world size), which prints its progress and unpickles anything: both kept from the user."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _weights_only(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=ENGINE_FOLDER)


class EngineState:
    """The engine writes its model and optimizer state into files of its own (`save_checkpoint`);
    dtrain makes them durable, hashes them with the rest, and loads them without running pickles."""

    def __init__(self, engine: DeepSpeedEngine, rank: int):
        self.engine, self.rank = engine, rank

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def write_files(self, folder: Path) -> list[Path]:
        """DeepSpeed does not fsync; this rank's files are those named after its rank (`zero_pp_rank_R_`),
        and on rank 0 also those named after none."""
        self.engine.save_checkpoint(str(folder), tag=ENGINE_FOLDER, save_latest=False)
        mine = [p for p in sorted((folder / ENGINE_FOLDER).rglob("*")) if p.is_file() and _writer(p.name) == self.rank]
        for file in mine:
            fsync_file(file)
        if self.rank == 0:
            fsync_dir(folder / ENGINE_FOLDER)
        return mine

    def read_files(self, folder: Path) -> None:
        """Load the engine's own files, unpickling only plain data (DeepSpeed itself would run any pickle)."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        class WeightsOnly(TorchCheckpointEngine):
            def load(self, path: str, map_location=None):
                with _weights_only():
                    return torch.load(path, map_location=map_location, weights_only=True)

        self.engine.checkpoint_engine = WeightsOnly()
        loaded, _ = self.engine.load_checkpoint(str(folder), tag=ENGINE_FOLDER, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"checkpoint {folder} holds no DeepSpeed state in {ENGINE_FOLDER}/.")


_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def _writer(name: str) -> int:
    match = _RANK_FILE.search(name)
    return int(match.group(1)) if match else 0


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """Every torch.load inside unpickles plain data only, even where DeepSpeed asks for `weights_only=False`, and
    allows the plain data types DeepSpeed puts in its files (found with
    `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 1-3, fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    forced = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if forced is None:
            del os.environ[_FORCE_WEIGHTS_ONLY]
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = forced
