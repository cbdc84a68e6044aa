"""Distributed data: every rank gets its own shard, in an order fixed by (seed, epoch).

A batch may have any structure: a tensor, tuples and lists, named tuples, mappings (the Hugging
Face `{"input_ids": ..., "labels": ...}`), dataclasses, nested; its tensors move to the device as
they are and anything else is left alone (`tree_map`, `move`). Three paths:
- `TensorDataset` and `TensorDictDataset` (data decoded once): tensors live on the training device
  and batches are sliced from them, with no worker processes and no per-sample Python;
- any other map-style `Dataset`: a `DataLoader` over the same shard (with the recipe's
  `collate_fn`, if any), batches moved to the device;
- an `IterableDataset`: every rank reads the stream and keeps its own share (element i to rank
  i % world size); for training only whole rounds, so that every rank takes as many steps.
The first two shard and shuffle exactly like `DistributedSampler` with `seed + epoch`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset, TensorDataset, get_worker_info

from dtrain.errors import UsageError


def tree_map(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """`batch` with `fn` applied to every tensor in it, its structure kept: tuples and lists, named
    tuples, mappings and dataclasses, nested; anything else is left as it is."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(tree_map(fn, item) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(tree_map(fn, item) for item in batch)
    if isinstance(batch, Mapping):
        mapped = {key: tree_map(fn, value) for key, value in batch.items()}
        kind: Any = type(batch)
        return mapped if kind is dict else kind(mapped)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: tree_map(fn, getattr(batch, f.name))
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def move(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda tensor: tensor.to(device, non_blocking=True), batch)


def batch_size_of(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    sizes: list[int] = []
    tree_map(lambda tensor: sizes.append(len(tensor)) if tensor.dim() else None, batch)
    if not sizes:
        raise TypeError(f"a batch of {type(batch).__name__} holds no tensor with a batch dimension")
    return sizes[0]


class TensorDictDataset(Dataset):
    """Named tensors of equal length, as one data set: sample i is `{name: tensor[i]}`. Like a
    `TensorDataset`, it stays on the training device and is sliced into batches of dicts."""

    def __init__(self, **tensors: torch.Tensor):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"TensorDictDataset needs tensors of one length, got {sorted(lengths)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


def steps_per_epoch(n: int, batch_size: int, world_size: int, limit: int | None = None) -> int:
    """Training batches per rank in an epoch of `n` samples (shards padded to equal length), at most `limit`:
    what a schedule over the whole run counts (divide by --grad-accum, rounding up, for optimizer steps)."""
    batches = math.ceil(math.ceil(n / world_size) / batch_size)
    return batches if limit is None else min(batches, limit)


def shard_indices(n: int, rank: int, world_size: int, *, shuffle: bool, seed: int, epoch: int,
                  pad: bool) -> torch.Tensor:
    """Indices of this rank's samples, exactly as `DistributedSampler` orders them.

    With `pad`, the order is extended by wrapping around so every rank takes the same number of
    steps (DDP needs that); without it (evaluation), every sample is seen exactly once overall.
    """
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    if pad:
        total = math.ceil(n / world_size) * world_size
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        return order[rank:total:world_size]
    return order[rank:n:world_size]


class ShardSampler(Sampler[int]):
    def __init__(self, n: int, rank: int, world_size: int, *, shuffle: bool, seed: int, pad: bool):
        self.n, self.rank, self.world_size = n, rank, world_size
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; `start` skips that many samples (resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def indices(self) -> torch.Tensor:
        return shard_indices(self.n, self.rank, self.world_size, shuffle=self.shuffle, seed=self.seed,
                             epoch=self.epoch, pad=self.pad)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:].tolist())

    def __len__(self) -> int:
        full = math.ceil(self.n / self.world_size) if self.pad else len(range(self.rank, self.n, self.world_size))
        return max(0, full - self.start)


class _ShardLoader:
    """Batches of one rank's shard; `set_epoch(epoch, start_batch)` picks the order and the resume point."""

    def __init__(self, batch_size: int, sampler: ShardSampler):
        self.batch_size = batch_size
        self.sampler = sampler

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    @property
    def start_batch(self) -> int:
        return self.sampler.start // self.batch_size

    def __len__(self) -> int:
        """Batches left in this epoch."""
        return math.ceil(len(self.sampler) / self.batch_size)


class InMemoryLoader(_ShardLoader):
    """Batches sliced from device-resident tensors (a tuple of them, or a dict): no worker
    processes, no per-sample Python."""

    def __init__(self, tensors: tuple[torch.Tensor, ...] | dict[str, torch.Tensor], batch_size: int,
                 sampler: ShardSampler, device: torch.device):
        super().__init__(batch_size, sampler)
        self.tensors = move(tensors, device)
        self.device = device

    def __iter__(self) -> Iterator[Any]:
        order = self.sampler.indices()[self.sampler.start:].to(self.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            yield tree_map(lambda tensor: tensor.index_select(0, index), self.tensors)


class DeviceLoader(_ShardLoader):
    """A `DataLoader` over a `ShardSampler` whose batches arrive on the training device."""

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ShardSampler, device: torch.device,
                 num_workers: int, collate_fn: Callable | None):
        super().__init__(batch_size, sampler)
        self.device = device
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                 collate_fn=collate_fn, pin_memory=device.type == "cuda",
                                 persistent_workers=num_workers > 0)

    def __iter__(self) -> Iterator[Any]:
        return _moved(iter(self.loader), self.device)


def _moved(batches: Iterator[Any], device: torch.device) -> Iterator[Any]:
    """The batches on the device. The DataLoader's iterator is made by the caller, at once: making it
    draws a seed from the global RNG, which a resumed run restores only after that draw."""
    for batch in batches:
        yield move(batch, device)


class RankShare(IterableDataset):
    """This rank's share of a stream: element i when i % world_size == rank (and, in a DataLoader
    with workers, its position in the share modulo the worker count); with `whole_rounds`, nothing
    of a last round of fewer than world_size elements, so every rank gets as many."""

    def __init__(self, stream: IterableDataset, rank: int, world_size: int, whole_rounds: bool):
        self.stream, self.rank, self.world_size, self.whole_rounds = stream, rank, world_size, whole_rounds

    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        last = self.world_size - 1 if self.whole_rounds else self.rank  # where in a round this rank's element goes out
        held, position = None, 0
        for i, element in enumerate(self.stream):
            if i % self.world_size == self.rank:
                held = element
            if i % self.world_size == last and held is not None:
                if position % workers == worker_id:
                    yield held
                held, position = None, position + 1


class StreamLoader:
    """Batches of this rank's share of an `IterableDataset`, on the device. Its length is unknown;
    `set_epoch` passes the epoch on to a stream that has `set_epoch`, and a resume re-reads the
    epoch's stream and skips the batches already trained (the same samples if the stream yields the
    same elements for the same epoch)."""

    def __init__(self, stream: IterableDataset, batch_size: int, rank: int, world_size: int, device: torch.device,
                 whole_rounds: bool, num_workers: int, collate_fn: Callable | None):
        self.batch_size, self.device, self.stream = batch_size, device, stream
        self.loader = DataLoader(RankShare(stream, rank, world_size, whole_rounds), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                                 pin_memory=device.type == "cuda")
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(_moved(iter(self.loader), self.device), self.start_batch, None)


def head(dataset: Dataset, n: int) -> Dataset:
    """The first `n` samples of a map-style dataset; a TensorDataset stays one (the in-memory path)."""
    if isinstance(dataset, IterableDataset):
        raise UsageError("limiting the batches of a stream (an IterableDataset) is up to the stream; pass a dataset "
                         "with a length, or leave the limit out.")
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(tensor[:n] for tensor in dataset.tensors))
    return Subset(dataset, range(min(n, len(cast(Sized, dataset)))))


def make_loader(dataset: Dataset, batch_size: int, *, rank: int, world_size: int, device: torch.device,
                shuffle: bool, seed: int, train: bool, num_workers: int = 0,
                collate_fn: Callable | None = None) -> InMemoryLoader | DeviceLoader | StreamLoader:
    if isinstance(dataset, IterableDataset):
        return StreamLoader(dataset, batch_size, rank, world_size, device, whole_rounds=train,
                            num_workers=num_workers, collate_fn=collate_fn)
    sampler = ShardSampler(len(cast(Sized, dataset)), rank, world_size, shuffle=shuffle, seed=seed, pad=train)
    if isinstance(dataset, (TensorDataset, TensorDictDataset)) and collate_fn is None:
        return InMemoryLoader(dataset.tensors if isinstance(dataset, TensorDictDataset) else tuple(dataset.tensors),
                              batch_size, sampler, device)
    return DeviceLoader(dataset, batch_size, sampler, device, num_workers, collate_fn)
