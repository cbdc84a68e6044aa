"""torch.distributed.checkpoint, imported only when a checkpoint is saved or loaded (half a second of
a worker's start-up otherwise): DCP's file writer, and loading that never runs pickled code: the
metadata through dtrain's allow-list unpickler, DCP's non-tensor values through
`torch.load(weights_only=True)`."""

from __future__ import annotations

import dataclasses
import enum
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, StorageWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from dtrain.core.checkpoints import CheckpointError

__all__ = ["CheckpointException", "async_save", "file_storage", "load", "load_whole", "read_metadata_safely", "save"]


def file_storage(folder: Path) -> StorageWriter:
    """DCP's file-system writer, which fsyncs every file it writes."""
    return FileSystemWriter(folder, sync_files=True)


def save(state_dict: dict[str, Any], writer: StorageWriter) -> None:
    dcp.save(state_dict, storage_writer=writer)


def async_save(state_dict: dict[str, Any], writer: StorageWriter, group: Any) -> Any:
    """The save's future; `group`: a process group of its own (on the default one it hangs once DDP
    traffic resumes)."""
    return dcp.async_save(state_dict, storage_writer=writer, process_group=group)


def load(state_dict: dict[str, Any], path: Path) -> None:
    """Load a checkpoint into `state_dict` in place, every rank its own part."""
    dcp.load(state_dict, storage_reader=SafeReader(path), planner=SafeLoadPlanner())


def load_whole(path: Path) -> dict[str, Any]:
    """Everything a checkpoint holds, in this one process (for `dtrain ckpt export`)."""
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=SafeReader(path), planner=SafeEmptyPlanner(), no_dist=True)
    return state


class SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        metadata = read_metadata_safely(Path(self.path))
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planners unpickle non-tensor values with weights_only=False; load them safely instead."""

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeEmptyPlanner(SafeLoadPlanner, _EmptyStateDictLoadPlanner):
    pass


# --- loading without running pickled code ----------------------------------------------------------

_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    """Allows only the plain data classes DCP's metadata is made of; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _lookup(module, name)
        if module in _METADATA_MODULES and isinstance(obj, type) and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
        if module == "torch" and (obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))):
            return obj
        if (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("collections", "OrderedDict")}:
            return obj
        raise pickle.UnpicklingError(f"{module}.{name}")


def _lookup(module: str, name: str) -> Any:
    try:
        obj = __import__(module, fromlist=[name])
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        return None


def read_metadata_safely(path: Path) -> Any:
    file = path / ".metadata"
    try:
        with open(file, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint file {file} asks to run {exc} while loading; refusing it "
                              "(a checkpoint never needs code).") from None
    except (OSError, EOFError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint file {file} is unreadable ({exc}).") from None
