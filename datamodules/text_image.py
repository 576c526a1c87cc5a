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


def _caption_loader(
    dataset: Dataset, batch_size: int, num_workers: int, seed: int | None
) -> DataLoader:
    """Batch ``(image, caption)`` items; ``seed`` shuffles per epoch (and drops the last
    partial batch), None keeps the order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed) if seed is not None else None,
        collate_fn=collate_captioned,
        num_workers=num_workers,
        drop_last=seed is not None,
    )


class _CaptionedFiles(Dataset):
    """Image files with captions, decoded when a batch is built."""

    def __init__(self, path: str, image_size: int, caption_field: str):
        from pathlib import Path

        from datamodules.jsonl import read_jsonl

        self.image_size = image_size
        self.items = []
        for record in read_jsonl(path):
            image = record.require("image", str)
            caption = record.require(caption_field, str)
            if not caption.strip():
                raise record.error(caption_field, caption, "empty caption", "write a caption")
            file = Path(image) if Path(image).is_absolute() else Path(path).parent / image
            if not file.is_file():
                raise record.error(
                    "image", image, f"image file not found at {file.resolve()}", "correct the path"
                )
            self.items.append((file, caption, record.path, record.line))
        if not self.items:
            raise ValueError(f"{path} contains no records.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        from datamodules.image_preference import load_image_file

        file, caption, path, line = self.items[index]
        return load_image_file(file, self.image_size, path, line, "image"), caption


class ImageCaptionDataModule(pl.LightningDataModule):
    """Image files with captions from JSON Lines, for the denoising (pre-training) loss.

    Record schema, one per line: ``{"image": "path/relative/to/the/file.png",
    "caption": "a photo of ..."}``. Images are converted to RGB, resized so the shorter
    side is ``image_size`` and center-cropped to a square, with values in [0, 1].
    Missing files and empty captions raise ``DataValidationError`` naming file, line,
    field and value when the data module is set up.

    Args:
        train_file: training records.
        val_file: validation records; None skips validation.
        image_size: side of the square images in pixels.
        caption_field: name of the caption field.
        batch_size: images per batch.
        num_workers: DataLoader worker processes, which also decode the images.
        seed: shuffling seed (the epoch number is added each epoch).
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        image_size: int = 512,
        caption_field: str = "caption",
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if image_size < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"image_size={image_size} and batch_size={batch_size} must be at least 1, "
                f"num_workers={num_workers} at least 0."
            )
        # Named explicitly, as in DigitsTextImageDataModule.
        self.save_hyperparameters(
            {
                "train_file": train_file,
                "val_file": val_file,
                "image_size": image_size,
                "caption_field": caption_field,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "seed": seed,
            }
        )
        self.splits: dict[str, Dataset] = {}

    def setup(self, stage: str) -> None:
        hparams = self.hparams
        if "train" not in self.splits:
            self.splits["train"] = _CaptionedFiles(
                hparams.train_file, hparams.image_size, hparams.caption_field
            )
            if hparams.val_file:
                self.splits["val"] = _CaptionedFiles(
                    hparams.val_file, hparams.image_size, hparams.caption_field
                )

    def train_dataloader(self) -> DataLoader:
        hparams = self.hparams
        return _caption_loader(
            self.splits["train"], hparams.batch_size, hparams.num_workers, hparams.seed
        )

    def val_dataloader(self) -> DataLoader:
        hparams = self.hparams
        return _caption_loader(
            self.splits.get("val", []), hparams.batch_size, hparams.num_workers, None
        )


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
        # Named explicitly: inside another data module built by LightningCLI, a bare
        # save_hyperparameters() would record that module's arguments instead.
        self.save_hyperparameters(
            {"batch_size": batch_size, "repeats": repeats, "num_workers": num_workers, "seed": seed}
        )
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
        hparams = self.hparams
        return _caption_loader(
            self.splits["train"], hparams.batch_size, hparams.num_workers, hparams.seed
        )

    def val_dataloader(self) -> DataLoader:
        hparams = self.hparams
        return _caption_loader(self.splits["val"], hparams.batch_size, hparams.num_workers, None)


class DigitsPromptDataModule(pl.LightningDataModule):
    """Prompts naming digits, for reward fine-tuning of the digits diffusion model.

    Training prompts are drawn at random (digit and phrasing) from a seeded generator.
    The validation prompts are fixed: every digit in each phrasing, ``val_repeats``
    times, so validation samples each digit equally often.

    Args:
        num_train_prompts: training prompts per epoch.
        val_repeats: copies of the 10 x 6 validation prompts.
        batch_size: prompts per batch.
        seed: seed of the training prompts and their order.
    """

    def __init__(
        self,
        num_train_prompts: int = 1000,
        val_repeats: int = 1,
        batch_size: int = 16,
        seed: int = 0,
    ):
        super().__init__()
        if num_train_prompts < 1 or val_repeats < 1 or batch_size < 1:
            raise ValueError(
                f"num_train_prompts={num_train_prompts}, val_repeats={val_repeats} and "
                f"batch_size={batch_size} must be at least 1."
            )
        # Named explicitly, as in DigitsTextImageDataModule.
        self.save_hyperparameters(
            {
                "num_train_prompts": num_train_prompts,
                "val_repeats": val_repeats,
                "batch_size": batch_size,
                "seed": seed,
            }
        )

    def setup(self, stage: str) -> None:
        from datamodules.digits_preference import DIGIT_WORDS, PROMPT_TEMPLATES

        rng = np.random.default_rng(self.hparams.seed)
        self.train_prompts = [
            PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(
                word=DIGIT_WORDS[digit], numeral=digit
            )
            for digit in rng.integers(10, size=self.hparams.num_train_prompts).tolist()
        ]
        self.val_prompts = [
            template.format(word=DIGIT_WORDS[digit], numeral=digit)
            for _ in range(self.hparams.val_repeats)
            for template in PROMPT_TEMPLATES
            for digit in range(10)
        ]

    def train_dataloader(self) -> DataLoader:
        from datamodules.loading import record_loader

        return record_loader(
            self.train_prompts, self.hparams.batch_size, shuffle=True, seed=self.hparams.seed
        )

    def val_dataloader(self) -> DataLoader:
        from datamodules.loading import record_loader

        return record_loader(self.val_prompts, self.hparams.batch_size, shuffle=False, seed=0)


class ReFLDataModule(pl.LightningDataModule):
    """Prompt batches for the reward loss, zipped with image-caption batches for the
    denoising loss: training batches are ``{"prompts": [...], "pretraining": (images, captions)}``.

    An epoch is as long as the longer of the two loaders, and the shorter one restarts
    when it runs out. Validation batches are the prompt module's validation prompts.

    Args:
        prompts: a data module whose loaders yield lists of prompts
            (``PromptDataModule`` or ``DigitsPromptDataModule``).
        pretraining: a data module of ``(images, captions)`` batches, or None for ReFL
            without the pre-training loss.
    """

    def __init__(
        self, prompts: pl.LightningDataModule, pretraining: pl.LightningDataModule | None = None
    ):
        super().__init__()
        self.prompts = prompts
        self.pretraining = pretraining

    def _modules(self) -> list[pl.LightningDataModule]:
        return [module for module in (self.prompts, self.pretraining) if module is not None]

    def prepare_data(self) -> None:
        for module in self._modules():
            module.prepare_data()

    def setup(self, stage: str) -> None:
        for module in self._modules():
            module.trainer = self.trainer
            module.setup(stage)

    def train_dataloader(self):
        from lightning.pytorch.utilities import CombinedLoader

        loaders = {"prompts": self.prompts.train_dataloader()}
        if self.pretraining is not None:
            loaders["pretraining"] = self.pretraining.train_dataloader()
        # An epoch is as long as the longer loader; the shorter one restarts when it ends.
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self):
        return self.prompts.val_dataloader()


class PreferenceTrainingDataModule(pl.LightningDataModule):
    """Training batches from a preference data module, validation batches from a prompt module.

    Diffusion-DPO trains on preference pairs (``ImagePreferenceDataModule`` or
    ``DigitsPreferenceDataModule`` batches) and is validated, like the other reward
    fine-tuning methods, by sampling the validation prompts.

    Args:
        preferences: a data module of ``PreferenceBatch`` training batches.
        prompts: a data module whose validation loader yields lists of prompts.
    """

    def __init__(self, preferences: pl.LightningDataModule, prompts: pl.LightningDataModule):
        super().__init__()
        self.preferences = preferences
        self.prompts = prompts

    def prepare_data(self) -> None:
        self.preferences.prepare_data()
        self.prompts.prepare_data()

    def setup(self, stage: str) -> None:
        for module in (self.preferences, self.prompts):
            module.trainer = self.trainer
            module.setup(stage)

    def train_dataloader(self) -> DataLoader:
        return self.preferences.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.prompts.val_dataloader()
