"""DataLoaders over lists of records, with resumable shuffling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[int]):
    """Shuffle with a generator seeded by ``seed + epoch``, so a resumed run gets the same order.

    Lightning calls :meth:`set_epoch` at the start of every training epoch.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def record_loader(
    records: Sequence[Any], batch_size: int, shuffle: bool, seed: int, num_workers: int = 0
) -> DataLoader:
    """Batch ``records`` as plain lists (the module featurizes them), shuffled per epoch if asked."""
    return DataLoader(
        records,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(records), seed) if shuffle else None,
        collate_fn=list,
        num_workers=num_workers,
        # Each new iterator draws a worker base seed from this generator instead of the
        # global one. Lightning creates the first iterator of a resumed run before the
        # checkpoint's RNG state is restored, so a global draw would shift dropout masks.
        generator=torch.Generator().manual_seed(seed),
    )
