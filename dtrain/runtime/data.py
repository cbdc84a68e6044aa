"""Distributed data: every rank gets its own shard, in an order fixed by (seed, epoch).

Two paths with the same sample order guarantees:
- `TensorDataset` (a data set decoded and normalised once): tensors live on the training
  device and batches are sliced from them, with no worker processes and no per-sample Python.
- any other `Dataset`: a `DataLoader` over the same shard, batches moved to the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset


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
    """Batches sliced from device-resident tensors: no worker processes, no per-sample Python."""

    def __init__(self, tensors: Sequence[torch.Tensor], batch_size: int, sampler: ShardSampler,
                 device: torch.device):
        super().__init__(batch_size, sampler)
        self.tensors = [t.to(device) for t in tensors]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.sampler.indices()[self.sampler.start:].to(self.tensors[0].device)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            yield tuple(t.index_select(0, index) for t in self.tensors)


class DeviceLoader(_ShardLoader):
    """A `DataLoader` over a `ShardSampler` whose batches arrive on the training device."""

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ShardSampler, device: torch.device,
                 num_workers: int):
        super().__init__(batch_size, sampler)
        self.device = device
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in self.loader:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)


def make_loader(dataset: Dataset, batch_size: int, *, rank: int, world_size: int, device: torch.device,
                shuffle: bool, seed: int, train: bool, num_workers: int = 0) -> InMemoryLoader | DeviceLoader:
    sampler = ShardSampler(len(dataset), rank, world_size, shuffle=shuffle, seed=seed, pad=train)
    if isinstance(dataset, TensorDataset):
        return InMemoryLoader(dataset.tensors, batch_size, sampler, device)
    return DeviceLoader(dataset, batch_size, sampler, device, num_workers)
