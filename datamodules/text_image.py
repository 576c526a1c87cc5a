"""Image-caption pairs for training text-to-image diffusion models.

Batches are ``(images, prompts)``: images ``Tensor[B, 3, S, S]`` with values in [0, 1]
and one caption per image.

:class:`DigitsTextImageDataModule` is the embedded set: the real handwritten digits of
scikit-learn at 32 x 32, captioned with the prompt phrasings of the digits preference
data ("a handwritten digit seven", ...). It trains on the digits that the preference
data draws its train candidates from (part (b) of
:func:`datamodules.digits_preference.load_digit_data`) and validates on the val part.
The part that fits the digit classifier stays unseen, so that classifier judges
generated digits independently.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.loading import EpochShuffleSampler


class _CaptionedDigits(Dataset):
    """Digits of one part, each captioned by a phrasing drawn once from a seeded generator."""

    def __init__(self, indices: Tensor, seed: int):
        from datamodules.digits_preference import (
            DIGIT_WORDS,
            PROMPT_TEMPLATES,
            load_digit_data,
        )

        data = load_digit_data()
        self.images = data.images[indices][:, None].expand(-1, 3, -1, -1)  # [M, 3, 32, 32]
        labels = data.labels[indices].tolist()
        rng = np.random.default_rng(seed)
        self.captions = [
            PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(
                word=DIGIT_WORDS[label], numeral=label
            )
            for label in labels
        ]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        return self.images[index], self.captions[index]


def collate_captioned(items: list[tuple[Tensor, str]]) -> tuple[Tensor, list[str]]:
    """Stack images into [B, 3, S, S] and keep the captions as a list."""
    images, captions = zip(*items, strict=True)
    return torch.stack(images), list(captions)


class DigitsTextImageDataModule(pl.LightningDataModule):
    """The scikit-learn digits as captioned 32 x 32 images (no download).

    Args:
        batch_size: images per batch.
        repeats: passes over the training digits per epoch, each with its own captions,
            so that an epoch is long enough to be worth a validation run.
        num_workers: DataLoader worker processes.
        seed: seed of captions and shuffling (the epoch number is added each epoch).
    """

    def __init__(self, batch_size: int = 64, repeats: int = 4, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if batch_size < 1 or repeats < 1 or num_workers < 0:
            raise ValueError(
                f"batch_size={batch_size} and repeats={repeats} must be at least 1, "
                f"num_workers={num_workers} at least 0."
            )
        self.save_hyperparameters()
        self.splits: dict[str, Dataset] = {}

    def setup(self, stage: str) -> None:
        from torch.utils.data import ConcatDataset

        from datamodules.digits_preference import load_digit_data

        data = load_digit_data()
        seed = self.hparams.seed
        if "train" not in self.splits:
            copies = [
                _CaptionedDigits(data.train_indices, seed + repeat)
                for repeat in range(self.hparams.repeats)
            ]
            self.splits["train"] = ConcatDataset(copies)
            self.splits["val"] = _CaptionedDigits(data.val_indices, seed + 1000)

    def train_dataloader(self) -> DataLoader:
        dataset = self.splits["train"]
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.hparams.seed),
            collate_fn=collate_captioned,
            num_workers=self.hparams.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.splits["val"],
            batch_size=self.hparams.batch_size,
            collate_fn=collate_captioned,
            num_workers=self.hparams.num_workers,
        )
