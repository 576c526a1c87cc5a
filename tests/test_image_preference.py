"""Image preference data: ratings, images, batches, invalid input, ImageReward and the DataModule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.image_preference import (
    DEFAULT_ASPECTS,
    ImagePreferenceDataModule,
    PreferenceBatch,
    collate_preferences,
    read_imagereward,
    read_preference_records,
)
from datamodules.jsonl import DataValidationError
from tests.conftest import REPO_ROOT

IMAGEREWARD_TEST = REPO_ROOT.parent / "shared" / "data" / "imagereward" / "test.json"
requires_imagereward = pytest.mark.skipif(
    not IMAGEREWARD_TEST.is_file(), reason=f"ImageReward test set not found at {IMAGEREWARD_TEST}"
)

# A 1 x 1 grayscale image, the smallest valid nested-list image.
PIXEL = [[0.5]]
VALID_ITEM = {"prompt": "p", "generations": ["a.png", "b.png"], "ranking": [1, 2]}


def _write_lines(path: Path, *records: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _valid_record(**changes) -> dict:
    record = {
        "prompt": "a red square",
        "images": [PIXEL, PIXEL],
        "scores": {"prompt_following": [0.75, 0.25]},
    }
    record.update(changes)
    return record


def test_scores_and_rankings_become_ratings(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "data.jsonl",
        {
            "id": "r1",
            "prompt": "a handwritten digit seven",
            "images": [PIXEL, PIXEL, PIXEL],
            "scores": {"prompt_following": [0.9, 0.1, 0.4]},
            "rankings": {"aesthetic": [1, 2, 2]},
        },
    )
    (record,) = read_preference_records(path, DEFAULT_ASPECTS, image_size=1)
    assert record.prompt == "a handwritten digit seven"
    assert record.id == "r1"
    assert record.line == 1
    assert list(record.ratings) == list(DEFAULT_ASPECTS)
    assert record.ratings["prompt_following"] == [0.9, 0.1, 0.4]
    assert record.ratings["aesthetic"] == [-1.0, -2.0, -2.0]
    assert all(math.isnan(value) for value in record.ratings["fidelity"])
    assert all(math.isnan(value) for value in record.ratings["harmlessness"])


def test_grayscale_array_repeats_to_rgb(tmp_path: Path) -> None:
    gray = [[0.0, 1.0], [0.5, 0.25]]
    path = _write_lines(tmp_path / "data.jsonl", _valid_record(images=[gray, PIXEL]))
    (record,) = read_preference_records(path, DEFAULT_ASPECTS, image_size=2)
    image = record.images[0]
    assert image.shape == (3, 2, 2)
    assert image.dtype == torch.float32
    for channel in range(3):
        assert image[channel].tolist() == gray


def test_rgb_array_becomes_channel_first(tmp_path: Path) -> None:
    rgb = [[[1.0, 0.0, 0.5], [0.0, 1.0, 0.25]], [[0.0, 0.0, 1.0], [0.5, 0.5, 0.5]]]  # H x W x 3
    path = _write_lines(tmp_path / "data.jsonl", _valid_record(images=[rgb, PIXEL]))
    (record,) = read_preference_records(path, DEFAULT_ASPECTS, image_size=2)
    image = record.images[0]
    assert image.shape == (3, 2, 2)
    assert image[:, 0, 0].tolist() == [1.0, 0.0, 0.5]
    assert image[:, 0, 1].tolist() == [0.0, 1.0, 0.25]
    assert image[:, 1, 0].tolist() == [0.0, 0.0, 1.0]


def test_resize_uses_antialiasing(tmp_path: Path) -> None:
    """Columns [0, 0, 1, 1] shrunk to 2 pixels with an antialiased bilinear filter.

    Shrinking by 2 widens the triangle filter to a radius of 2 input pixels. Output pixel 0
    is centred at input 0.5, so inputs 0, 1 and 2 get weights 0.75, 0.75 and 0.25 (input -1
    is outside), and the value is 0.25 / 1.75 = 1/7. Without antialiasing it would be 0.
    """
    stripes = [[0.0, 0.0, 1.0, 1.0]] * 4
    path = _write_lines(tmp_path / "data.jsonl", _valid_record(images=[stripes, PIXEL]))
    (record,) = read_preference_records(path, DEFAULT_ASPECTS, image_size=2)
    image = record.images[0]
    assert image.shape == (3, 2, 2)
    assert image[0, 0].tolist() == pytest.approx([1 / 7, 6 / 7], abs=1e-6)
    assert image[0, 1].tolist() == pytest.approx([1 / 7, 6 / 7], abs=1e-6)


def test_wide_image_center_cropped(tmp_path: Path) -> None:
    # 2 x 6 columns: 0 0 | 0.5 0.5 | 1 1. The shorter side is already 2, so the 2 x 2
    # center crop keeps the middle pair of columns only.
    wide = [[0.0, 0.0, 0.5, 0.5, 1.0, 1.0]] * 2
    path = _write_lines(tmp_path / "data.jsonl", _valid_record(images=[wide, PIXEL]))
    (record,) = read_preference_records(path, DEFAULT_ASPECTS, image_size=2)
    image = record.images[0]
    assert image.shape == (3, 2, 2)
    assert torch.equal(image, torch.full((3, 2, 2), 0.5))


def test_image_file_resized_to_square(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "wide.png", (255, 0, 128), size=(6, 3))
    gray = Image.new("L", (5, 5), 51)
    gray.save(tmp_path / "images" / "gray.png")
    path = _write_lines(
        tmp_path / "data.jsonl", _valid_record(images=["images/wide.png", "images/gray.png"])
    )
    (record,) = read_preference_records(path, DEFAULT_ASPECTS, image_size=4)
    wide, converted = record.images
    assert wide.shape == (3, 4, 4)
    assert wide.dtype == torch.float32
    assert torch.allclose(wide[0], torch.ones(4, 4))
    assert torch.allclose(wide[1], torch.zeros(4, 4))
    assert torch.allclose(wide[2], torch.full((4, 4), 128 / 255))
    assert converted.shape == (3, 4, 4)
    assert torch.allclose(converted, torch.full((3, 4, 4), 51 / 255))


def test_absolute_image_path(tmp_path: Path) -> None:
    image = _write_image(tmp_path / "elsewhere" / "a.png", (0, 255, 0))
    path = _write_lines(tmp_path / "data" / "d.jsonl", _valid_record(images=[str(image), PIXEL]))
    (record,) = read_preference_records(path, DEFAULT_ASPECTS, image_size=2)
    assert record.images[0][:, 0, 0].tolist() == [0.0, 1.0, 0.0]


def test_lazy_paths_decoded_by_collate(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.png", (0, 0, 255))
    path = _write_lines(tmp_path / "data.jsonl", _valid_record(images=["a.png", PIXEL]))
    (record,) = read_preference_records(path, DEFAULT_ASPECTS, image_size=3, load_images=False)
    assert record.images[0] == tmp_path / "a.png"
    batch = collate_preferences([record], DEFAULT_ASPECTS)
    assert batch.images.shape == (2, 3, 3, 3)
    assert batch.images[0, :, 1, 1].tolist() == [0.0, 0.0, 1.0]
    assert batch.images[1, :, 1, 1].tolist() == [0.5, 0.5, 0.5]


def test_lazy_missing_file_fails_at_collate(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "data.jsonl", _valid_record(images=[PIXEL, "gone.png"]))
    (record,) = read_preference_records(path, DEFAULT_ASPECTS, image_size=2, load_images=False)
    with pytest.raises(DataValidationError) as error:
        collate_preferences([record], DEFAULT_ASPECTS)
    message = str(error.value)
    assert f"{path}:1:" in message
    assert "field 'images[1]'" in message
    assert str(tmp_path / "gone.png") in message


def test_batch_layout(tmp_path: Path) -> None:
    # Every image is a constant whose value is its position in the batch, times 0.1.
    def constant(value: float) -> list[list[float]]:
        return [[value, value], [value, value]]

    path = _write_lines(
        tmp_path / "data.jsonl",
        {
            "prompt": "first",
            "images": [constant(0.0), constant(0.1)],
            "scores": {"fidelity": [0.5, 0.25]},
            "rankings": {"aesthetic": [2, 1]},
        },
        {
            "prompt": "second",
            "images": [constant(0.2), constant(0.3), constant(0.4)],
            "scores": {"aesthetic": [3.0, 2.0, 1.0]},
        },
    )
    aspects = ("fidelity", "aesthetic")
    records = read_preference_records(path, aspects, image_size=2)
    batch = collate_preferences(records, aspects)

    assert isinstance(batch, PreferenceBatch)
    assert batch.prompts == ["first", "second"]
    assert batch.aspects == aspects
    assert batch.images.shape == (5, 3, 2, 2)
    assert batch.images.dtype == torch.float32
    assert batch.images[:, 0, 0, 0].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert batch.group.dtype == torch.int64
    assert batch.group.tolist() == [0, 0, 1, 1, 1]
    assert batch.ratings.shape == (5, 2)
    assert batch.ratings.dtype == torch.float32
    assert batch.ratings[:2].tolist() == [[0.5, -2.0], [0.25, -1.0]]
    assert torch.isnan(batch.ratings[2:, 0]).all()
    assert batch.ratings[2:, 1].tolist() == [3.0, 2.0, 1.0]


def test_batch_to_moves_tensors(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "data.jsonl", _valid_record())
    batch = collate_preferences(read_preference_records(path, DEFAULT_ASPECTS, 2), DEFAULT_ASPECTS)
    moved = batch.to("meta")
    assert moved.images.device.type == "meta"
    assert moved.group.device.type == "meta"
    assert moved.ratings.device.type == "meta"
    assert moved.prompts == batch.prompts
    assert moved.aspects == batch.aspects
    assert batch.images.device.type == "cpu"


def test_collate_rejects_dropped_aspect(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "data.jsonl", _valid_record())
    records = read_preference_records(path, DEFAULT_ASPECTS, image_size=1)
    with pytest.raises(ValueError, match="prompt_following"):
        collate_preferences(records, ("aesthetic",))


def test_collate_skips_unrated_aspects(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "data.jsonl", _valid_record())
    records = read_preference_records(path, DEFAULT_ASPECTS, image_size=1)
    batch = collate_preferences(records, ("prompt_following", "fidelity"))
    assert batch.ratings[:, 0].tolist() == [0.75, 0.25]
    assert torch.isnan(batch.ratings[:, 1]).all()


INVALID_RECORDS = [
    # (case, changes to a valid record, field, text the message must contain)
    ("missing prompt", {"prompt": None}, "prompt", "missing"),
    ("empty prompt", {"prompt": "  "}, "prompt", "empty"),
    ("one image", {"images": [PIXEL]}, "images", "at least 2"),
    ("images not a list", {"images": "a.png"}, "images", "expected list"),
    ("image of wrong type", {"images": [5, PIXEL]}, "images[0]", "got int"),
    ("missing image file", {"images": [PIXEL, "missing.png"]}, "images[1]", "missing.png"),
    ("unreadable image", {"images": ["broken.png", PIXEL]}, "images[0]", "cannot decode"),
    ("value above 1", {"images": [[[0.0, 1.5]], PIXEL]}, "images[0]", "1.5"),
    ("negative value", {"images": [[[-0.5, 0.0]], PIXEL]}, "images[0]", "-0.5"),
    ("two channels", {"images": [[[[0.0, 0.0]]], PIXEL]}, "images[0]", "[1, 1, 2]"),
    ("flat list", {"images": [[0.5, 0.5], PIXEL]}, "images[0]", "[2]"),
    ("ragged rows", {"images": [[[0.5, 0.5], [0.5]], PIXEL]}, "images[0]", "rectangular"),
    (
        "scores of wrong length",
        {"scores": {"prompt_following": [0.5]}},
        "scores.prompt_following",
        "1 values for 2 images",
    ),
    (
        "ranking of wrong length",
        {"scores": {}, "rankings": {"aesthetic": [1, 2, 3]}},
        "rankings.aesthetic",
        "3 values for 2 images",
    ),
    (
        "unknown aspect",
        {"scores": {"beauty": [0.5, 0.5]}},
        "scores.beauty",
        "'prompt_following', 'aesthetic', 'fidelity', 'harmlessness'",
    ),
    (
        "aspect in scores and rankings",
        {"scores": {"aesthetic": [0.5, 0.1]}, "rankings": {"aesthetic": [1, 2]}},
        "rankings.aesthetic",
        "both",
    ),
    (
        "non-numeric score",
        {"scores": {"prompt_following": ["high", 0.1]}},
        "scores.prompt_following",
        "'high'",
    ),
    (
        "boolean score",
        {"scores": {"prompt_following": [True, 0.1]}},
        "scores.prompt_following",
        "True",
    ),
    ("rank below 1", {"scores": {}, "rankings": {"aesthetic": [0, 1]}}, "rankings.aesthetic", "0"),
    (
        "fractional rank",
        {"scores": {}, "rankings": {"aesthetic": [1.5, 2]}},
        "rankings.aesthetic",
        "1.5",
    ),
    ("no ratings", {"scores": None}, "scores", "rates no aspect"),
    ("empty ratings", {"scores": {}, "rankings": {}}, "scores", "rates no aspect"),
    ("scores not a mapping", {"scores": [0.5, 0.5]}, "scores", "expected an object"),
    ("id not a string", {"id": 7}, "id", "expected a string"),
]


@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [case[1:] for case in INVALID_RECORDS],
    ids=[case[0] for case in INVALID_RECORDS],
)
def test_invalid_record_names_location(
    tmp_path: Path, changes: dict, field: str, expected: str
) -> None:
    (tmp_path / "broken.png").write_bytes(b"this is not an image")
    record = {key: value for key, value in _valid_record(**changes).items() if value is not None}
    path = _write_lines(tmp_path / "bad.jsonl", _valid_record(), "", record)
    with pytest.raises(DataValidationError) as error:
        read_preference_records(path, DEFAULT_ASPECTS, image_size=2)
    message = str(error.value)
    assert f"{path}:3:" in message
    assert f"field {field!r}" in message
    assert expected in message
    assert "Fix:" in message


def test_missing_image_names_resolved_path(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "data.jsonl", _valid_record(images=["sub/../x.png", PIXEL]))
    with pytest.raises(DataValidationError, match="image file not found") as error:
        read_preference_records(path, DEFAULT_ASPECTS, image_size=2)
    assert f"not found at {(tmp_path / 'x.png').resolve()}" in str(error.value)


def test_invalid_json_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", _valid_record(), '{"prompt": ')
    with pytest.raises(DataValidationError, match=r"bad\.jsonl:2: field '<line>'"):
        read_preference_records(path, DEFAULT_ASPECTS, image_size=2)


def test_empty_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contains no records"):
        read_preference_records(_write_lines(tmp_path / "empty.jsonl", ""), DEFAULT_ASPECTS, 2)


def test_imagereward_synthetic_file(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "a.png", (255, 255, 255))
    _write_image(tmp_path / "images" / "b.png", (0, 0, 0))
    items = [{"id": "x-1", "prompt": "a cat", "generations": ["a.png", "b.png"], "ranking": [2, 1]}]
    path = tmp_path / "rankings.json"
    path.write_text(json.dumps(items, indent=4), encoding="utf-8")

    (record,) = read_imagereward(path, "aesthetic", image_root=tmp_path / "images", image_size=2)
    assert record.id == "x-1"
    assert record.line == 2
    assert record.ratings == {"aesthetic": [-2.0, -1.0]}
    assert record.images[0].tolist() == torch.ones(3, 2, 2).tolist()
    assert record.images[1].tolist() == torch.zeros(3, 2, 2).tolist()

    batch = collate_preferences([record], DEFAULT_ASPECTS)
    assert batch.ratings[:, 1].tolist() == [-2.0, -1.0]
    assert torch.isnan(batch.ratings[:, [0, 2, 3]]).all()


@pytest.mark.parametrize(
    ("item", "field", "expected"),
    [
        ({"prompt": "p", "generations": ["a.png"], "ranking": [1]}, "generations", "at least 2"),
        ({"prompt": "p", "generations": ["a.png", 3], "ranking": [1, 2]}, "generations[1]", "3"),
        ({"prompt": "p", "generations": ["a.png", "b.png"]}, "ranking", "missing"),
        ({"prompt": "p", "generations": ["a.png", "b.png"], "ranking": [1, 0]}, "ranking", "0"),
        ({"prompt": "p", "generations": ["a.png", "b.png"], "ranking": [1]}, "ranking", "1 values"),
        ({"prompt": "", "generations": ["a.png", "b.png"], "ranking": [1, 2]}, "prompt", "empty"),
        ("text", "<record>", "expected a JSON object"),
    ],
)
def test_imagereward_invalid_item_names_line(
    tmp_path: Path, item: dict | str, field: str, expected: str
) -> None:
    path = tmp_path / "rankings.json"
    text = json.dumps([VALID_ITEM, item], indent=4)
    path.write_text(text, encoding="utf-8")
    # The second item starts on the line after the first item's closing "    },".
    second_line = text.splitlines().index("    },") + 2
    with pytest.raises(DataValidationError) as error:
        read_imagereward(path, "aesthetic", load_images=False)
    message = str(error.value)
    assert f"{path}:{second_line}:" in message
    assert f"field {field!r}" in message
    assert expected in message


def test_imagereward_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "rankings.json"
    path.write_text(f'[\n  {json.dumps(VALID_ITEM)},\n  {{"prompt": }}\n]\n', encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"rankings\.json:3: field '<json>'"):
        read_imagereward(path, "aesthetic", load_images=False)


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ('{"prompt": "p"}', 1, "expected a JSON array"),
        (f"[\n{json.dumps(VALID_ITEM)}\n{json.dumps(VALID_ITEM)}]", 3, "expected ',' or ']'"),
        ("[\n]\n]", 3, "after the closing"),
    ],
)
def test_imagereward_layout_errors(tmp_path: Path, text: str, line: int, expected: str) -> None:
    path = tmp_path / "rankings.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataValidationError) as error:
        read_imagereward(path, "aesthetic", load_images=False)
    assert f"{path}:{line}:" in str(error.value)
    assert expected in str(error.value)


def test_imagereward_empty_array_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rankings.json"
    path.write_text("[ ]", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no records"):
        read_imagereward(path, "aesthetic", load_images=False)


@requires_imagereward
def test_imagereward_test_set_counts() -> None:
    records = read_imagereward(IMAGEREWARD_TEST, "prompt_following", load_images=False)
    assert len(records) == 466
    assert sum(len(record.images) for record in records) == 2720
    first = records[0]
    assert first.id == "005658-0040"
    assert first.line == 2
    assert first.ratings == {"prompt_following": [-1.0, -2.0, -5.0, -3.0]}
    assert first.images[0] == (
        IMAGEREWARD_TEST.parent
        / "part-005658/images/0040/45b0de4d-5a57-4ae3-8810-ffbd328204fd.webp"
    )
    assert records[1].line == 18


@requires_imagereward
def test_imagereward_test_set_keeps_ties() -> None:
    records = {
        record.id: record
        for record in read_imagereward(IMAGEREWARD_TEST, "aesthetic", load_images=False)
    }
    assert records["005695-0057"].ratings["aesthetic"] == [-1.0, -2.0, -1.0, -4.0, -3.0, -4.0]


@requires_imagereward
def test_imagereward_test_set_without_images() -> None:
    with pytest.raises(DataValidationError) as error:
        read_imagereward(IMAGEREWARD_TEST, "aesthetic", image_root="/nonexistent")
    message = str(error.value)
    assert f"{IMAGEREWARD_TEST}:2:" in message
    assert "field 'generations[0]'" in message
    assert "/nonexistent/part-005658/images/0040/" in message


def _write_dataset(directory: Path, count: int) -> Path:
    """Write ``count`` records with two PNG images each; record i's prompt is ``prompt i``."""
    records = []
    for index in range(count):
        first = f"images/{index}-0.png"
        second = f"images/{index}-1.png"
        _write_image(directory / first, (index * 10, 0, 0))
        _write_image(directory / second, (0, index * 10, 0))
        records.append(
            {
                "prompt": f"prompt {index}",
                "images": [first, second],
                "rankings": {"aesthetic": [1, 2]},
            }
        )
    return _write_lines(directory / "train.jsonl", *records)


def _epoch_order(loader, epoch: int) -> list[str]:
    loader.sampler.set_epoch(epoch)
    return [prompt for batch in loader for prompt in batch.prompts]


def test_datamodule_shuffles_per_epoch(tmp_path: Path) -> None:
    train_file = _write_dataset(tmp_path, 6)
    arguments = dict(train_file=str(train_file), image_size=4, batch_size=4, seed=3)
    datamodule = ImagePreferenceDataModule(**arguments)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()

    batch = next(iter(loader))
    assert isinstance(batch, PreferenceBatch)
    assert batch.images.shape == (8, 3, 4, 4)
    assert batch.group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert batch.aspects == DEFAULT_ASPECTS

    epoch_zero = _epoch_order(loader, 0)
    assert sorted(epoch_zero) == [f"prompt {index}" for index in range(6)]
    assert _epoch_order(loader, 1) != epoch_zero
    assert _epoch_order(loader, 0) == epoch_zero

    again = ImagePreferenceDataModule(**arguments)
    again.setup("fit")
    assert _epoch_order(again.train_dataloader(), 0) == epoch_zero


def test_datamodule_splits_and_limit(tmp_path: Path) -> None:
    train_file = _write_dataset(tmp_path, 5)
    datamodule = ImagePreferenceDataModule(
        train_file=str(train_file),
        val_file=str(train_file),
        test_file=str(train_file),
        aspects=["aesthetic"],
        image_size=2,
        batch_size=2,
        max_train_records=3,
    )
    assert datamodule.aspects == ("aesthetic",)
    datamodule.setup("fit")
    assert len(datamodule.splits["train"]) == 3
    assert [prompt for batch in datamodule.val_dataloader() for prompt in batch.prompts] == [
        f"prompt {index}" for index in range(5)
    ]
    assert datamodule.test_dataloader() == []
    datamodule.setup("test")
    first = next(iter(datamodule.test_dataloader()))
    assert first.ratings.tolist() == [[-1.0], [-2.0], [-1.0], [-2.0]]
    # Record 1's first image is RGB (10, 0, 0).
    assert first.images[2, :, 0, 0].tolist() == pytest.approx([10 / 255, 0.0, 0.0])


def test_datamodule_setup_finds_missing_image(tmp_path: Path) -> None:
    train_file = _write_dataset(tmp_path, 3)
    (tmp_path / "images" / "2-1.png").unlink()
    datamodule = ImagePreferenceDataModule(train_file=str(train_file), image_size=2)
    with pytest.raises(DataValidationError) as error:
        datamodule.setup("fit")
    message = str(error.value)
    assert f"{train_file}:3:" in message
    assert "field 'images[1]'" in message
    assert str(tmp_path / "images" / "2-1.png") in message


def test_datamodule_reads_imagereward(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.png", (255, 0, 0))
    _write_image(tmp_path / "b.png", (0, 255, 0))
    items = [{"prompt": "p", "generations": ["a.png", "b.png"], "ranking": [1, 1]}]
    path = tmp_path / "rankings.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    datamodule = ImagePreferenceDataModule(
        train_file=str(path),
        aspects=["aesthetic", "fidelity"],
        image_size=2,
        file_format="imagereward",
        imagereward_aspect="fidelity",
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert torch.isnan(batch.ratings[:, 0]).all()
    assert batch.ratings[:, 1].tolist() == [-1.0, -1.0]
    assert batch.images[:, :, 0, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_datamodule_rejects_invalid_arguments() -> None:
    with pytest.raises(ValueError) as error:
        ImagePreferenceDataModule(
            train_file="train.jsonl",
            aspects=["aesthetic", "aesthetic"],
            image_size=0,
            batch_size=0,
            num_workers=-1,
            max_train_records=0,
            file_format="csv",
        )
    message = str(error.value)
    assert "aspects=['aesthetic', 'aesthetic'] contains duplicates" in message
    assert "image_size=0" in message
    assert "batch_size=0" in message
    assert "num_workers=-1" in message
    assert "max_train_records=0" in message
    assert "file_format='csv'" in message


def test_datamodule_rejects_unconfigured_imagereward_aspect() -> None:
    with pytest.raises(ValueError, match="imagereward_aspect='fidelity' is not one of"):
        ImagePreferenceDataModule(
            train_file="test.json",
            aspects=["aesthetic"],
            file_format="imagereward",
            imagereward_aspect="fidelity",
        )


def test_datamodule_rejects_empty_aspects() -> None:
    with pytest.raises(ValueError, match="aspects is empty"):
        ImagePreferenceDataModule(train_file="train.jsonl", aspects=[])
