"""Where a worker's training batches come from: a split held on the device, or a stream of shards.

Both sources hand the trainer float32 batches in [0, 1] on the worker's device, scaled from the
uint8 pixels there (dynamic binarisation follows in the trainer, on the same device). The on-device
source suits small data: the split sits on the device and a batch is an index into it. The streamed
source suits data larger than memory: batches arrive from an iterator per epoch (Ray Data's, set up
in `components.training.ray_train`) and the split is only ever read one shard at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

FIT_CHUNK_IMAGES = 4096  # images per piece when the whole split is handed over in pieces


def to_unit_float(batch: Tensor) -> Tensor:
    """uint8 pixels as float32 in [0, 1] (the division `components.data.shards.unit_float` does);
    a float batch is taken as already scaled."""
    return batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()


class BatchSource(Protocol):
    """This worker's training batches, epoch by epoch, and the whole split for `fit_after_training`."""

    def __len__(self) -> int: ...  # batches per epoch on this worker

    def epoch(self, epoch: int) -> Iterator[Tensor]: ...

    def whole_split(self) -> Iterator[Tensor]: ...


class DeviceBatches:
    """Per-worker shards of one array held on the device: DDP-consistent, no host copies per step."""

    def __init__(self, data: np.ndarray, batch_size: int, *, rank: int, world_size: int, seed: int, device):
        self.data = torch.from_numpy(np.ascontiguousarray(data)).to(device)
        self.batch_size = batch_size
        self.sampler = DistributedSampler(
            range(len(data)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def batch(self, rows: Tensor) -> Tensor:
        """The images at `rows`, scaled."""
        return to_unit_float(self.data[rows.to(self.data.device)])

    def epoch(self, epoch: int) -> Iterator[Tensor]:
        self.sampler.set_epoch(epoch)
        index = torch.tensor(list(self.sampler), device=self.data.device)
        yield from (self.batch(chunk) for chunk in index.split(self.batch_size))

    def whole_split(self) -> Iterator[Tensor]:
        yield from (to_unit_float(chunk) for chunk in self.data.split(FIT_CHUNK_IMAGES))


def streamed_batches_per_epoch(num_images: int, world_size: int, batch_size: int) -> int:
    """Batches each worker gets per epoch when a split of `num_images` is cut into `world_size` equal
    parts (the remainder of the division is left out of that epoch, as Ray Data's equal split does)."""
    per_worker = num_images // world_size
    if per_worker == 0:
        raise ValueError(f"{num_images} training images cannot be split across {world_size} workers")
    return math.ceil(per_worker / batch_size)


class StreamedBatches:
    """Batches from an iterator per epoch of uint8 tensors; the shards again, read in turn, for fitting."""

    def __init__(
        self,
        epoch_batches: Callable[[int], Iterable[Tensor]],
        batches_per_epoch: int,
        shard_files: list[str],
        device,
    ):
        self.epoch_batches, self.batches_per_epoch = epoch_batches, batches_per_epoch
        self.shard_files, self.device = shard_files, device

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch(self, epoch: int) -> Iterator[Tensor]:
        for batch in self.epoch_batches(epoch):
            yield to_unit_float(batch.to(self.device, non_blocking=True))

    def whole_split(self) -> Iterator[Tensor]:
        for path in self.shard_files:
            yield to_unit_float(torch.from_numpy(np.load(path, allow_pickle=False)).to(self.device))
