"""Captioned digits for diffusion training, and the sample grid callback."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from callbacks.diffusion import SampleGrid
from datamodules.digits_preference import digit_from_prompt, load_digit_data
from datamodules.text_image import DigitsTextImageDataModule


def test_digits_batches_match_their_captions() -> None:
    data = DigitsTextImageDataModule(batch_size=16, repeats=2, seed=3)
    data.setup("fit")
    digits = load_digit_data()
    train = data.splits["train"]
    assert len(train) == 2 * len(digits.train_indices)

    images, captions = next(iter(data.train_dataloader()))
    assert images.shape == (16, 3, 32, 32)
    assert images.min() >= 0
    assert images.max() <= 1
    # Each caption names the digit of its own image: find the image among part (b).
    part = digits.images[digits.train_indices]
    labels = digits.labels[digits.train_indices]
    for image, caption in zip(images, captions, strict=True):
        matches = (part == image[0]).flatten(1).all(dim=1).nonzero().flatten()
        assert len(matches) >= 1
        assert digit_from_prompt(caption) == labels[matches[0]].item()


def test_digits_never_use_the_classifier_part() -> None:
    data = DigitsTextImageDataModule(batch_size=8, repeats=1)
    data.setup("fit")
    digits = load_digit_data()
    classifier_images = digits.images[digits.classifier_indices].flatten(1)
    splits = {"train": data.splits["train"].datasets[0], "val": data.splits["val"]}
    for split, dataset in splits.items():
        images = dataset.images[:, 0].flatten(1)
        # No image of the split equals a classifier-part image.
        equal = (images[:, None, :] == classifier_images[None, :, :]).all(dim=2)
        assert not equal.any(), split


def test_digits_shuffle_depends_on_seed_and_epoch() -> None:
    def first_captions(seed: int, epoch: int) -> list[str]:
        data = DigitsTextImageDataModule(batch_size=8, repeats=1, seed=seed)
        data.setup("fit")
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[1]

    assert first_captions(0, 0) == first_captions(0, 0)
    assert first_captions(0, 0) != first_captions(0, 1)


class _Generator(pl.LightningModule):
    """Returns one bright image per prompt and records the seed it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.logged = {}

    def generate(self, prompts, seed, num_inference_steps, guidance_scale):
        self.calls.append((list(prompts), seed, num_inference_steps, guidance_scale))
        return torch.ones(len(prompts), 3, 4, 4)

    def log(self, name, value, **kwargs):
        self.logged[name] = float(value)


class _HalfAnnotator:
    aspects = ("prompt_following",)

    def annotate(self, prompts, images):
        return {"prompt_following": torch.tensor([1.0, 0.0, float("nan")][: len(prompts)])}


class _Trainer:
    sanity_checking = False
    is_global_zero = True
    loggers = []
    logger = None
    global_step = 0

    def __init__(self, epoch: int):
        self.current_epoch = epoch


def test_sample_grid_logs_annotator_mean_every_n_epochs() -> None:
    callback = SampleGrid(
        ["one", "two", "three"], every_n_epochs=2, seed=9, annotator=_HalfAnnotator()
    )
    module = _Generator()
    callback.on_validation_epoch_end(_Trainer(epoch=0), module)
    assert module.calls == []
    callback.on_validation_epoch_end(_Trainer(epoch=1), module)
    assert module.calls == [(["one", "two", "three"], 9, None, None)]
    # NaN marks an image the annotator could not score; the mean skips it.
    assert module.logged == {"val/samples/prompt_following": pytest.approx(0.5)}


def test_sample_grid_rejects_empty_prompts() -> None:
    with pytest.raises(ValueError, match="at least one prompt"):
        SampleGrid([])


def _write_pairs(tmp_path, records: list[dict]) -> str:
    import json

    from PIL import Image

    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (12, 8), (255, 0, 0)).save(tmp_path / "images" / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "images" / "blue.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def test_image_caption_files_batch(tmp_path) -> None:
    from datamodules.text_image import ImageCaptionDataModule

    path = _write_pairs(
        tmp_path,
        [
            {"image": "images/red.png", "caption": "a red square"},
            {"image": "images/blue.png", "caption": "a blue square"},
        ],
    )
    data = ImageCaptionDataModule(train_file=path, image_size=4, batch_size=2)
    data.setup("fit")
    images, captions = next(iter(data.train_dataloader()))
    assert images.shape == (2, 3, 4, 4)
    by_caption = dict(zip(captions, images, strict=True))
    assert torch.allclose(by_caption["a red square"][0], torch.ones(4, 4))
    assert torch.allclose(by_caption["a blue square"][2], torch.ones(4, 4))
    assert torch.allclose(by_caption["a blue square"][0], torch.zeros(4, 4))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"image": "images/missing.png", "caption": "x"},
            "pairs.jsonl:1: field 'image'.*not found",
        ),
        ({"image": "images/red.png", "caption": " "}, "pairs.jsonl:1: field 'caption'.*empty"),
        ({"image": "images/red.png"}, "pairs.jsonl:1: field 'caption'.*missing"),
    ],
)
def test_image_caption_bad_records(tmp_path, record: dict, message: str) -> None:
    from datamodules.jsonl import DataValidationError
    from datamodules.text_image import ImageCaptionDataModule

    data = ImageCaptionDataModule(train_file=_write_pairs(tmp_path, [record]), image_size=4)
    with pytest.raises(DataValidationError, match=message):
        data.setup("fit")
