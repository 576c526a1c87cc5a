"""Text-to-image preference records: one prompt, several images, per-aspect ratings.

Notation: K images in one record, G records (prompt groups) in a batch, N images in a
batch (the sum of K over its records), A aspects, S the image size after resizing.

JSON Lines format, one record per prompt::

    {"id": "optional string",
     "prompt": "a handwritten digit seven",
     "images": ["images/000123.png", [[0.0, 0.5], [1.0, 0.25]]],
     "scores": {"prompt_following": [0.9, 0.1], "fidelity": [1.0, 0.3]},
     "rankings": {"aesthetic": [1, 2]}}

- ``images``: at least 2 entries. Each is either a path to an image file or a nested
  list of numbers in [0, 1], H x W (grayscale) or H x W x 3 (RGB). A relative path is
  read from the directory of the JSON Lines file, and absolute paths work too.
- ``scores``: per aspect, one number per image; higher is better.
- ``rankings``: per aspect, one integer per image; 1 is the best and equal ranks are ties.
- An aspect appears in ``scores`` or in ``rankings``, not both, and at least one aspect
  is rated. Every aspect name must be one of the configured aspects. A configured aspect
  that a record does not rate has no rating (NaN) for that record.

Ratings are "higher is better" floats: a score is kept as given and a rank ``r`` becomes
``-r``, so that ties stay ties. Every image is converted to RGB, resized so that its
shorter side is S (bilinear with antialiasing), center-cropped to S x S, as the reward
model's own preprocessing does, and stored as float32 values in [0, 1].

ImageReward format (the human rankings that the ImageReward project publishes, such as
its ``data/test.json``): one JSON array of objects ``{"id", "prompt", "generations":
[relative image paths], "ranking": [ints, 1 = best, ties allowed]}``.
:func:`read_imagereward` reads each ranking as the rankings of one configured aspect.

VisionPrefer from the Hugging Face Hub: when the machine is online and the ``datasets``
package is installed (it is not a paperlab dependency), ``datasets.load_dataset(<the
dataset's repository id on the Hub>, split="train")`` downloads a dataset by name. This
module reads local files only, and the Hub dataset's column names have not been checked
against it. To train on it, convert each row to the JSON Lines record above (prompt,
image files written next to the JSON Lines file, per-aspect scores) and pass that file
as ``train_file``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.jsonl import DataValidationError, JsonlRecord, read_jsonl
from datamodules.loading import EpochShuffleSampler

# The four aspects that VisionPrefer rates ("Multimodal Large Language Model is a
# Human-Aligned Annotator for Text-to-Image Generation", arXiv 2404.15100).
DEFAULT_ASPECTS = ("prompt_following", "aesthetic", "fidelity", "harmlessness")

_IMAGE_FIX = "put a readable image file at that path, or correct the path in the record"
_WHITESPACE = re.compile(r"[ \t\r\n]*")


@dataclass
class PreferenceBatch:
    """A batch of prompt groups with all their images concatenated, as the reward model reads it."""

    prompts: list[str]  # [G] one prompt per group (record)
    images: Tensor  # [N, 3, S, S] float32 in [0, 1], all groups concatenated in order
    group: Tensor  # [N] int64, index into prompts
    ratings: Tensor  # [N, A] float32, higher is better, NaN = no rating
    aspects: tuple[str, ...]  # the A aspect names, in column order

    def to(self, device: torch.device | str) -> PreferenceBatch:
        """Return a copy with the tensors moved to ``device``."""
        return PreferenceBatch(
            prompts=self.prompts,
            images=self.images.to(device),
            group=self.group.to(device),
            ratings=self.ratings.to(device),
            aspects=self.aspects,
        )


@dataclass
class PreferenceRecord:
    """One prompt with its K images and their ratings, and where it was read from.

    An entry of ``images`` is either a decoded float32 tensor [3, S, S] in [0, 1] or the
    path of an image file that :meth:`load_images` decodes later, so that a large data
    set need not fit in memory. Nested-list images are always decoded when read.
    """

    prompt: str
    images: list[Tensor | Path]
    ratings: dict[str, list[float]]  # aspect -> K ratings, higher is better, NaN = no rating
    path: Path
    line: int
    image_size: int
    image_field: str = "images"  # field name used in error messages ("generations" for ImageReward)
    id: str | None = None

    def load_images(self) -> Tensor:
        """Decode the images that are still paths and return all K images as [K, 3, S, S]."""
        decoded = [
            image
            if isinstance(image, Tensor)
            else load_image_file(
                image, self.image_size, self.path, self.line, f"{self.image_field}[{index}]"
            )
            for index, image in enumerate(self.images)
        ]
        return torch.stack(decoded)


def _resize(image: Tensor, image_size: int) -> Tensor:
    """Resize a float [3, H, W] image so its shorter side is S, then center-crop to [3, S, S]."""
    resized = F.resize(
        image,
        image_size,
        interpolation=F.InterpolationMode.BILINEAR,
        antialias=True,
    )
    resized = F.center_crop(resized, [image_size, image_size])
    # Bilinear weights are non-negative and sum to one, so only rounding can leave [0, 1].
    return resized.clamp_(0.0, 1.0)


def _missing_image_error(path: Path, line: int, field: str, file: Path) -> DataValidationError:
    return DataValidationError(
        path, line, field, str(file), f"image file not found at {file.resolve()}", _IMAGE_FIX
    )


def load_image_file(file: Path, image_size: int, path: Path, line: int, field: str) -> Tensor:
    """Decode an image file into float32 [3, S, S] in [0, 1].

    ``path``, ``line`` and ``field`` locate the record that names ``file``, for errors.

    Raises:
        DataValidationError: the file is missing or Pillow cannot decode it.
    """
    if not file.is_file():
        raise _missing_image_error(path, line, field, file)
    try:
        with Image.open(file) as image:
            rgb = image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise DataValidationError(
            path,
            line,
            field,
            str(file),
            f"cannot decode the image at {file.resolve()} ({error})",
            "replace it with a valid image file (PNG, JPEG, WebP, ...)",
        ) from None
    pixels = F.to_dtype(F.pil_to_tensor(rgb), torch.float32, scale=True)  # [3, H, W]
    return _resize(pixels, image_size)


def _image_from_array(source: JsonlRecord, field: str, values: list, image_size: int) -> Tensor:
    """Convert a nested-list image (H x W or H x W x 3) to float32 [3, S, S]."""
    try:
        array = torch.tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise source.error(
            field,
            values,
            "not a rectangular nested list of numbers",
            "write H rows of W numbers (grayscale) or H rows of W [r, g, b] triples",
        ) from None

    shape = list(array.shape)
    is_grayscale = array.dim() == 2
    is_rgb = array.dim() == 3 and shape[2] == 3
    if not (is_grayscale or is_rgb) or shape[0] == 0 or shape[1] == 0:
        raise source.error(
            field,
            values,
            f"array of shape {shape} is neither H x W (grayscale) nor H x W x 3 (RGB)",
            "write H rows of W numbers (grayscale) or H rows of W [r, g, b] triples",
        )

    # NaN fails both comparisons, so it is reported as out of range too.
    outside = ~((array >= 0.0) & (array <= 1.0))
    if outside.any():
        index = outside.nonzero()[0].tolist()
        raise source.error(
            field,
            values,
            f"value {array[tuple(index)].item()} at index {index} is outside [0, 1]",
            "scale pixel values to [0, 1] (divide 8-bit values by 255)",
        )

    if is_grayscale:
        image = array.unsqueeze(0).expand(3, -1, -1)  # [H, W] -> [3, H, W]
    else:
        image = array.permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    return _resize(image.to(torch.float32).contiguous(), image_size)


def _parse_prompt(source: JsonlRecord) -> str:
    prompt = source.require("prompt", str)
    if not prompt.strip():
        raise source.error("prompt", prompt, "the prompt is empty", "write the prompt text")
    return prompt


def _parse_id(source: JsonlRecord) -> str | None:
    record_id = source.data.get("id")
    if record_id is not None and not isinstance(record_id, str):
        raise source.error(
            "id", record_id, "expected a string", "store the id as a JSON string, or leave it out"
        )
    return record_id


def _check_image_count(source: JsonlRecord, field: str, entries: list) -> None:
    if len(entries) < 2:
        raise source.error(
            field,
            entries,
            f"{len(entries)} image(s), but a preference record needs at least 2",
            "add more images of the same prompt, or drop the record",
        )


def _parse_path(source: JsonlRecord, field: str, entry: str, root: Path) -> Path:
    if not entry.strip():
        raise source.error(field, entry, "the image path is empty", "write the image's file path")
    # An absolute entry replaces root in the join.
    return root / entry


def _parse_images(source: JsonlRecord, image_size: int, load_images: bool) -> list[Tensor | Path]:
    entries = source.require("images", list)
    _check_image_count(source, "images", entries)
    images: list[Tensor | Path] = []
    for index, entry in enumerate(entries):
        field = f"images[{index}]"
        if isinstance(entry, str):
            file = _parse_path(source, field, entry, source.path.parent)
            if load_images:
                images.append(load_image_file(file, image_size, source.path, source.line, field))
            else:
                images.append(file)
        elif isinstance(entry, list):
            images.append(_image_from_array(source, field, entry, image_size))
        else:
            raise source.error(
                field,
                entry,
                f"expected a path string or a nested list of numbers, got {type(entry).__name__}",
                "give the image as a file path or as H x W or H x W x 3 numbers in [0, 1]",
            )
    return images


def _check_rating_list(source: JsonlRecord, field: str, values: Any, num_images: int) -> list:
    if not isinstance(values, list):
        raise source.error(
            field,
            values,
            f"expected a list with one value per image, got {type(values).__name__}",
            "write a JSON list of numbers in the order of the images",
        )
    if len(values) != num_images:
        raise source.error(
            field,
            values,
            f"{len(values)} values for {num_images} images",
            "give exactly one value per image, in the order of the images",
        )
    return values


def _parse_scores(source: JsonlRecord, field: str, values: Any, num_images: int) -> list[float]:
    for value in _check_rating_list(source, field, values, num_images):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise source.error(
                field, values, f"non-numeric score {value!r}", "write every score as a JSON number"
            )
        if not math.isfinite(value):
            raise source.error(
                field,
                values,
                f"non-finite score {value!r}",
                "write finite scores, and leave the aspect out of a record that has no rating",
            )
    return [float(value) for value in values]


def _parse_ranking(source: JsonlRecord, field: str, values: Any, num_images: int) -> list[float]:
    for value in _check_rating_list(source, field, values, num_images):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise source.error(
                field,
                values,
                f"rank {value!r} is not an integer of at least 1",
                "write ranks as JSON integers, 1 for the best image and equal ranks for ties",
            )
    # Negated so that higher is better, like scores.
    return [-float(value) for value in values]


def _parse_ratings(
    source: JsonlRecord, aspects: Sequence[str], num_images: int
) -> dict[str, list[float]]:
    ratings = {aspect: [math.nan] * num_images for aspect in aspects}
    rated: set[str] = set()
    parsers = {"scores": _parse_scores, "rankings": _parse_ranking}
    for kind, parse in parsers.items():
        if kind not in source.data:
            continue
        mapping = source.data[kind]
        if not isinstance(mapping, dict):
            raise source.error(
                kind,
                mapping,
                f"expected an object mapping aspect names to lists, got {type(mapping).__name__}",
                'write e.g. {"aesthetic": [...]} with one value per image',
            )
        for aspect, values in mapping.items():
            field = f"{kind}.{aspect}"
            if aspect not in ratings:
                raise source.error(
                    field,
                    values,
                    f"unknown aspect {aspect!r} (configured aspects: {list(aspects)})",
                    "rename it to a configured aspect, or add it to the aspects argument",
                )
            if aspect in rated:
                raise source.error(
                    field,
                    values,
                    f"aspect {aspect!r} appears in both 'scores' and 'rankings'",
                    "keep the aspect in only one of the two",
                )
            ratings[aspect] = parse(source, field, values, num_images)
            rated.add(aspect)

    if not rated:
        raise source.error(
            "scores",
            source.data.get("scores"),
            "the record rates no aspect: 'scores' and 'rankings' are both missing or empty",
            "add per-image scores or rankings for at least one aspect",
        )
    return ratings


def _check_image_size(image_size: int) -> None:
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be at least 1.")


def read_preference_records(
    path: str | Path, aspects: Sequence[str], image_size: int, load_images: bool = True
) -> list[PreferenceRecord]:
    """Read and validate every record of a JSON Lines preference file.

    Args:
        path: the JSON Lines file (format in the module docstring).
        aspects: the configured aspect names. Each record's ratings has one entry per
            aspect, in this order.
        image_size: side S of the square images.
        load_images: decode image files now (True) or keep their paths for
            :meth:`PreferenceRecord.load_images` (False, which does not open the files).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataValidationError: a record is invalid. The message names the file, the line,
            the field, the value and the fix.
        ValueError: the file contains no records.
    """
    _check_image_size(image_size)
    path = Path(path)
    records = []
    for source in read_jsonl(path):
        prompt = _parse_prompt(source)
        images = _parse_images(source, image_size, load_images)
        ratings = _parse_ratings(source, aspects, len(images))
        records.append(
            PreferenceRecord(
                prompt=prompt,
                images=images,
                ratings=ratings,
                path=path,
                line=source.line,
                image_size=image_size,
                id=_parse_id(source),
            )
        )
    if not records:
        raise ValueError(f"{path} contains no records; expected one preference record per line.")
    return records


def _read_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, item)`` for each item of a JSON array file.

    The line number is that of the item's first character, so that errors point into a
    pretty-printed file. Items are yielded as they are parsed, so the caller's error for
    an invalid item comes before a JSON syntax error later in the file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"JSON file not found: {path.resolve()}")
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()

    def invalid(position: int, problem: str) -> DataValidationError:
        line = text.count("\n", 0, position) + 1
        snippet = text[position : position + 40]
        return DataValidationError(
            path, line, "<json>", snippet, problem, "write one JSON array of objects, [{...}, ...]"
        )

    position = _WHITESPACE.match(text, 0).end()
    if not text.startswith("[", position):
        raise invalid(position, "expected a JSON array")
    position = _WHITESPACE.match(text, position + 1).end()
    line, counted_until = 1, 0
    expect_item = not text.startswith("]", position)
    while expect_item:
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataValidationError(
                path,
                error.lineno,
                "<json>",
                text[error.pos : error.pos + 40],
                f"invalid JSON ({error.msg} at column {error.colno})",
                "write one JSON array of objects, [{...}, ...]",
            ) from None
        line += text.count("\n", counted_until, position)
        counted_until = position
        yield line, item

        position = _WHITESPACE.match(text, end).end()
        if text.startswith(",", position):
            position = _WHITESPACE.match(text, position + 1).end()
        elif text.startswith("]", position):
            expect_item = False
        else:
            raise invalid(position, "expected ',' or ']' after an array item")

    trailing = _WHITESPACE.match(text, position + 1).end()
    if trailing != len(text):
        raise invalid(trailing, "unexpected text after the closing ']'")


def read_imagereward(
    path: str | Path,
    aspect: str,
    image_root: str | Path | None = None,
    load_images: bool = True,
    image_size: int = 224,
) -> list[PreferenceRecord]:
    """Read an ImageReward ranking file (a JSON array) as rankings of one aspect.

    Args:
        path: the JSON file, e.g. ImageReward's ``data/test.json``.
        aspect: the aspect the rankings rate; the records' ratings contain only this one.
        image_root: directory that the ``generations`` paths are relative to; None uses
            the directory of ``path``.
        load_images: decode the images now (True) or keep their paths without opening
            them (False), which is how the file can be read without the images.
        image_size: side S of the square images.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataValidationError: the file is not a JSON array of objects, or an item is
            invalid. The message names the file, the line where the item starts, the
            field, the value and the fix.
        ValueError: the array is empty, or ``aspect`` or ``image_size`` is invalid.
    """
    if not isinstance(aspect, str) or not aspect:
        raise ValueError(f"aspect={aspect!r} must be a non-empty aspect name.")
    _check_image_size(image_size)
    path = Path(path)
    root = path.parent if image_root is None else Path(image_root)
    records = []
    for line, item in _read_json_array(path):
        if not isinstance(item, dict):
            raise DataValidationError(
                path,
                line,
                "<record>",
                item,
                f"expected a JSON object, got {type(item).__name__}",
                'write each item as {"id", "prompt", "generations", "ranking"}',
            )
        source = JsonlRecord(path, line, item)
        prompt = _parse_prompt(source)

        generations = source.require("generations", list)
        _check_image_count(source, "generations", generations)
        images: list[Tensor | Path] = []
        for index, entry in enumerate(generations):
            field = f"generations[{index}]"
            if not isinstance(entry, str):
                raise source.error(
                    field,
                    entry,
                    f"expected an image path string, got {type(entry).__name__}",
                    "write each generation as a path relative to image_root",
                )
            file = _parse_path(source, field, entry, root)
            images.append(
                load_image_file(file, image_size, path, line, field) if load_images else file
            )

        ranking = _parse_ranking(source, "ranking", source.require("ranking", list), len(images))
        records.append(
            PreferenceRecord(
                prompt=prompt,
                images=images,
                ratings={aspect: ranking},
                path=path,
                line=line,
                image_size=image_size,
                image_field="generations",
                id=_parse_id(source),
            )
        )
    if not records:
        raise ValueError(f"{path} contains no records; expected a JSON array of prompt objects.")
    return records


def collate_preferences(
    records: Sequence[PreferenceRecord], aspects: Sequence[str]
) -> PreferenceBatch:
    """Concatenate the records' images, in record order, into one :class:`PreferenceBatch`.

    Image paths are decoded here. An aspect of ``aspects`` that is not in a record's
    ratings gets NaN ratings for that record's images.

    Raises:
        ValueError: ``records`` is empty, or a record has a non-NaN rating for an aspect
            that is not in ``aspects``.
        DataValidationError: an image file is missing or cannot be decoded.
    """
    if not records:
        raise ValueError("collate_preferences needs at least one record.")
    aspects = tuple(aspects)
    images, groups, ratings = [], [], []
    for index, record in enumerate(records):
        # Dropping a rated aspect would lose its labels silently, but an all-NaN one has none.
        unknown = sorted(
            aspect
            for aspect, values in record.ratings.items()
            if aspect not in aspects and not all(math.isnan(value) for value in values)
        )
        if unknown:
            raise ValueError(
                f"{record.path}:{record.line}: the record rates {unknown}, which are not among "
                f"the aspects {list(aspects)}. Read the file with the same aspects."
            )
        num_images = len(record.images)
        images.append(record.load_images())  # [K, 3, S, S]
        groups.append(torch.full((num_images,), index, dtype=torch.int64))
        columns = [record.ratings.get(aspect, [math.nan] * num_images) for aspect in aspects]
        ratings.append(torch.tensor(columns, dtype=torch.float32).T)  # [A, K] -> [K, A]

    return PreferenceBatch(
        prompts=[record.prompt for record in records],
        images=torch.cat(images),  # [N, 3, S, S]
        group=torch.cat(groups),  # [N]
        ratings=torch.cat(ratings),  # [N, A]
        aspects=aspects,
    )


def _check_image_files(records: Sequence[PreferenceRecord]) -> None:
    """Raise for the first image path that is not a file, without decoding anything."""
    for record in records:
        for index, image in enumerate(record.images):
            if isinstance(image, Path) and not image.is_file():
                field = f"{record.image_field}[{index}]"
                raise _missing_image_error(record.path, record.line, field, image)


class ImagePreferenceDataModule(pl.LightningDataModule):
    """Prompt groups of images with per-aspect ratings; batches are :class:`PreferenceBatch`.

    Record schema (``file_format: jsonl``), one JSON object per line::

        {"id": "optional string",
         "prompt": "non-empty string",
         "images": ["path/relative/to/the/file.png", [[0.0, 1.0], [0.5, 0.25]], ...],
         "scores": {"<aspect>": [one number per image, higher is better]},
         "rankings": {"<aspect>": [one integer per image, 1 = best, ties allowed]}}

    ``images`` has at least 2 entries: file paths, or nested lists H x W or H x W x 3 of
    numbers in [0, 1]. Each aspect is in ``scores`` or ``rankings``, never both, at least
    one aspect is rated, and every aspect is in ``aspects``. An aspect that a record
    leaves out has NaN ratings. With ``file_format: imagereward`` each file is one JSON
    array of ``{"id", "prompt", "generations", "ranking"}`` objects, read as rankings of
    ``imagereward_aspect``. The module docstring gives the details.

    ``setup`` reads the files and checks that every image file exists. The images are
    decoded and resized when a batch is built, in the DataLoader workers, so a file that
    cannot be decoded raises at that batch and not in ``setup``. With ``num_workers > 0``
    the DataLoader re-raises that :class:`DataValidationError` as a ``RuntimeError``
    whose message contains the original one.

    Args:
        train_file: training records.
        val_file: validation records; None skips validation.
        test_file: test records; None leaves ``test_dataloader`` empty.
        aspects: the rated aspects, in the column order of ``PreferenceBatch.ratings``.
        image_size: side of the square images after resizing, in pixels.
        batch_size: records (prompt groups) per batch; images per batch vary with the
            number of images per record.
        num_workers: DataLoader worker processes, which also decode the images.
        seed: shuffling seed (the epoch number is added each epoch).
        max_train_records: use only the first N training records (None: all).
        file_format: ``jsonl`` for the JSON Lines format, ``imagereward`` for
            ImageReward's JSON array of rankings.
        imagereward_aspect: the aspect that ImageReward rankings rate; must be one of
            ``aspects``.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        aspects: Sequence[str] = DEFAULT_ASPECTS,
        image_size: int = 224,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        max_train_records: int | None = None,
        file_format: Literal["jsonl", "imagereward"] = "jsonl",
        imagereward_aspect: str = "prompt_following",
    ):
        super().__init__()
        aspects = list(aspects)
        self._check_arguments(
            aspects,
            image_size,
            batch_size,
            num_workers,
            max_train_records,
            file_format,
            imagereward_aspect,
        )
        # Named explicitly: a subclass's own arguments would otherwise replace these.
        self.save_hyperparameters(
            {
                "train_file": train_file,
                "val_file": val_file,
                "test_file": test_file,
                "aspects": aspects,
                "image_size": image_size,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "seed": seed,
                "max_train_records": max_train_records,
                "file_format": file_format,
                "imagereward_aspect": imagereward_aspect,
            }
        )
        self.aspects: tuple[str, ...] = tuple(aspects)
        self.splits: dict[str, list[PreferenceRecord]] = {}

    @staticmethod
    def _check_arguments(
        aspects: list[str],
        image_size: int,
        batch_size: int,
        num_workers: int,
        max_train_records: int | None,
        file_format: str,
        imagereward_aspect: str,
    ) -> None:
        problems = []
        if not aspects:
            problems.append("aspects is empty; name at least one aspect")
        if len(set(aspects)) != len(aspects):
            problems.append(f"aspects={aspects} contains duplicates")
        if any(not isinstance(aspect, str) or not aspect for aspect in aspects):
            problems.append(f"aspects={aspects} must contain non-empty strings only")
        if image_size < 1:
            problems.append(f"image_size={image_size} must be at least 1")
        if batch_size < 1:
            problems.append(f"batch_size={batch_size} must be at least 1")
        if num_workers < 0:
            problems.append(f"num_workers={num_workers} must be 0 or more")
        if max_train_records is not None and max_train_records < 1:
            problems.append(f"max_train_records={max_train_records} must be at least 1, or None")
        if file_format not in ("jsonl", "imagereward"):
            problems.append(f"file_format={file_format!r} must be 'jsonl' or 'imagereward'")
        if file_format == "imagereward" and imagereward_aspect not in aspects:
            problems.append(
                f"imagereward_aspect={imagereward_aspect!r} is not one of aspects={aspects}; "
                "add it to aspects or choose one of them"
            )
        if problems:
            raise ValueError(
                "Invalid ImagePreferenceDataModule arguments: " + "; ".join(problems) + "."
            )

    def _read(self, path: str, limit: int | None = None) -> list[PreferenceRecord]:
        hparams = self.hparams
        if hparams.file_format == "imagereward":
            records = read_imagereward(
                path,
                hparams.imagereward_aspect,
                load_images=False,
                image_size=hparams.image_size,
            )
        else:
            records = read_preference_records(
                path, self.aspects, hparams.image_size, load_images=False
            )
        records = records[:limit] if limit is not None else records
        _check_image_files(records)
        return records

    def setup(self, stage: str) -> None:
        hparams = self.hparams
        if stage == "fit" and "train" not in self.splits:
            self.splits["train"] = self._read(hparams.train_file, hparams.max_train_records)
        if stage in ("fit", "validate") and hparams.val_file and "val" not in self.splits:
            self.splits["val"] = self._read(hparams.val_file)
        if stage == "test" and hparams.test_file and "test" not in self.splits:
            self.splits["test"] = self._read(hparams.test_file)

    def _loader(self, records: list[PreferenceRecord], shuffle: bool) -> DataLoader:
        # record_loader batches plain lists, but this collate function decodes the images,
        # which belongs in the worker processes.
        hparams = self.hparams
        return DataLoader(
            records,
            batch_size=hparams.batch_size,
            sampler=EpochShuffleSampler(len(records), hparams.seed) if shuffle else None,
            collate_fn=partial(collate_preferences, aspects=self.aspects),
            num_workers=hparams.num_workers,
            # Worker base seeds come from this generator and not the global one, because
            # Lightning creates the first iterator of a resumed run before it restores the
            # checkpoint's RNG state.
            generator=torch.Generator().manual_seed(hparams.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.splits["val"], shuffle=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.splits["test"], shuffle=False) if "test" in self.splits else []
