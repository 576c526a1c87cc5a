"""Prompt files: every format, auto-detection, invalid input, and the data module."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from datamodules.jsonl import DataValidationError
from datamodules.prompts import (
    PromptDataModule,
    PromptRecord,
    deduplicate_prompts,
    detect_format,
    filter_categories,
    read_prompts,
)
from tests.conftest import REPO_ROOT

DATA_DIR = REPO_ROOT.parent / "shared" / "data"
PARTI_FILE = DATA_DIR / "t2i_prompts" / "PartiPrompts.tsv"
DRAWBENCH_FILE = DATA_DIR / "t2i_prompts" / "drawbench.csv"
REFL_FILE = DATA_DIR / "imagereward" / "refl_data.json"
BENCHMARK_FILE = DATA_DIR / "imagereward" / "benchmark-prompts.json"


def _requires(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.is_file(), reason=f"data file not found: {path}")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


PARTI_SAMPLE = (
    "Prompt\tCategory\tChallenge\tNote\n"
    "a red apple\tProduce & Plants\tBasic\t\n"
    '"G I G G L E" painted as graffiti\tIllustrations\tWriting & Symbols\tquotes kept\n'
    "  a cat on a mat  \tAnimals\t\t\n"
)
DRAWBENCH_SAMPLE = (
    "Prompt,Category\n"
    "A red colored car.,Colors\n"
    '"A stack of 3 plates, a blue one on top.",DALL-E\n'
    '"A sign that reads\n""hello"".",Text\n'
    "A horse riding an astronaut.,Gary Marcus et al. \n"
)


def _prompt_file(directory: Path, texts: list[str], name: str = "prompts.txt") -> Path:
    return _write(directory / name, "".join(f"{text}\n" for text in texts))


def _texts(records: list[PromptRecord]) -> list[str]:
    return [record.text for record in records]


# Formats


def test_txt_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.txt", "# header comment\n\na red car\n   # indented comment\n  a dog  \r\n"
    )
    records = read_prompts(path)
    assert _texts(records) == ["a red car", "a dog"]
    assert [record.line for record in records] == [3, 5]
    assert records[0].path == str(path)
    assert records[0].location == f"{path}:3"
    assert records[0].category is None


def test_parti_keeps_metadata(tmp_path: Path) -> None:
    records = read_prompts(_write(tmp_path / "parti.tsv", PARTI_SAMPLE))
    assert _texts(records) == [
        "a red apple",
        '"G I G G L E" painted as graffiti',
        "a cat on a mat",
    ]
    assert [record.line for record in records] == [2, 3, 4]
    assert records[0].category == "Produce & Plants"
    assert records[0].challenge == "Basic"
    assert records[1].challenge == "Writing & Symbols"
    assert records[2].challenge is None


def test_parti_without_optional_columns(tmp_path: Path) -> None:
    records = read_prompts(_write(tmp_path / "p.tsv", "Prompt\na red apple\n"))
    assert _texts(records) == ["a red apple"]
    assert records[0].category is None
    assert records[0].challenge is None


def test_drawbench_quoting_and_lines(tmp_path: Path) -> None:
    records = read_prompts(_write(tmp_path / "drawbench.csv", DRAWBENCH_SAMPLE))
    assert _texts(records) == [
        "A red colored car.",
        "A stack of 3 plates, a blue one on top.",
        'A sign that reads\n"hello".',
        "A horse riding an astronaut.",
    ]
    # The quoted prompt on lines 4-5 spans two lines, so the last row starts on line 6.
    assert [record.line for record in records] == [2, 3, 4, 6]
    assert [record.category for record in records] == [
        "Colors",
        "DALL-E",
        "Text",
        "Gary Marcus et al.",
    ]
    assert records[0].challenge is None


def test_drawbench_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("Prompt,Category\r\na cat,Animals\r\n".encode("utf-8-sig"))
    records = read_prompts(path)
    assert _texts(records) == ["a cat"]
    assert records[0].category == "Animals"


def test_imagereward_refl_array(tmp_path: Path) -> None:
    items = [
        {"text": "a castle at dusk ", "image": "000044-0048"},
        {"text": "a fox in snow", "image": "000044-0049"},
    ]
    path = _write(tmp_path / "refl.json", json.dumps(items, indent=4))
    records = read_prompts(path)
    assert _texts(records) == ["a castle at dusk", "a fox in snow"]
    # indent=4 puts "[" on line 1 and each object over four lines.
    assert [record.line for record in records] == [2, 6]


def test_json_array_custom_column(tmp_path: Path) -> None:
    items = [{"id": "1", "prompt": "a blue bird"}]
    path = _write(tmp_path / "benchmark.json", json.dumps(items))
    assert _texts(read_prompts(path, column="prompt")) == ["a blue bird"]


def test_jsonl_default_and_custom_column(tmp_path: Path) -> None:
    lines = [{"prompt": "a tree", "caption": "c1"}, {"prompt": "a lake", "caption": "c2"}]
    path = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n")
    records = read_prompts(path)
    assert _texts(records) == ["a tree", "a lake"]
    assert [record.line for record in records] == [1, 2]
    assert _texts(read_prompts(path, column="caption")) == ["c1", "c2"]


def test_csv_custom_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "Prompts,Category\na cat,Animals\n")
    assert _texts(read_prompts(path, column="Prompts")) == ["a cat"]


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    path = _write(tmp_path / "parti.data", "Prompt\tCategory\na cat\tAnimals\n")
    records = read_prompts(path, file_format="parti")
    assert _texts(records) == ["a cat"]
    assert records[0].category == "Animals"


# Auto-detection


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.txt", "a cat\n", "txt"),
        ("P.TXT", "a cat\n", "txt"),
        ("p.tsv", "Prompt\n", "parti"),
        ("p.csv", "Prompt\n", "drawbench"),
        ("p.jsonl", '{"prompt": "a"}\n', "jsonl"),
        ("p.json", '\n  [{"text": "a"}]', "imagereward_refl"),
        ("p.json", '{"prompt": "a"}\n', "jsonl"),
    ],
)
def test_detect_format(tmp_path: Path, name: str, content: str, expected: str) -> None:
    assert detect_format(_write(tmp_path / name, content)) == expected


def test_detect_unknown_extension(tmp_path: Path) -> None:
    path = _write(tmp_path / "prompts.md", "a cat\n")
    with pytest.raises(ValueError, match=r"'\.md'.*file_format"):
        read_prompts(path)


def test_detect_json_other_content(tmp_path: Path) -> None:
    path = _write(tmp_path / "prompts.json", '"a cat"\n')
    with pytest.raises(ValueError, match="must start with"):
        read_prompts(path)


# Invalid input


@pytest.mark.parametrize(
    ("name", "content", "line", "field"),
    [
        ("p.tsv", "Text\tCategory\na cat\tAnimals\n", 1, "Prompt"),
        ("p.tsv", "Prompt\tCategory\na cat\tAnimals\na dog\n", 3, "<row>"),
        ("p.tsv", "Prompt\tCategory\na cat\tAnimals\n   \tAnimals\n", 3, "Prompt"),
        ("p.csv", "Prompt,Category\na cat,Animals\na dog, a bird,Animals\n", 3, "<row>"),
        ("p.csv", 'Prompt,Category\na cat,Animals\n"a dog,Animals\nmore\n', 3, "<row>"),
        ("p.csv", 'Prompt,Category\na cat,Animals\n"a" dog,Animals\n', 3, "<row>"),
        ("p.csv", "Prompt,Category\na cat,Animals\n,Animals\n", 3, "Prompt"),
        ("p.json", '[{"text": "a"},\n {"image": "x"}]', 2, "text[1]"),
        ("p.json", '[{"text": "a"},\n {"text": ""}]', 2, "text[1]"),
        ("p.json", '[{"text": "a"},\n {"text": 7}]', 2, "text[1]"),
        ("p.json", '[{"text": "a"},\n "a dog"]', 2, "<record[1]>"),
        ("p.json", '[{"text": "a"},\n {"text": "b",}]', 2, "<json>"),
        ("p.jsonl", '{"prompt": "a"}\n{"caption": "b"}\n', 2, "prompt"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "  "}\n', 2, "prompt"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": ["b"]}\n', 2, "prompt"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": \n', 2, "<line>"),
    ],
)
def test_invalid_input_names_location(
    tmp_path: Path, name: str, content: str, line: int, field: str
) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataValidationError) as error:
        read_prompts(path)
    message = str(error.value)
    assert f"{path}:{line}:" in message
    assert f"field {field!r}" in message
    assert "Fix:" in message
    assert error.value.line == line
    assert error.value.field == field


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\na caf\xe9\n")
    with pytest.raises(DataValidationError) as error:
        read_prompts(path)
    message = str(error.value)
    assert f"{path}:2:" in message
    assert "invalid UTF-8" in message
    assert "Fix:" in message


def test_no_prompts_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.txt", "# only a comment\n\n")
    with pytest.raises(ValueError, match="contains no prompts"):
        read_prompts(path)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_column_rejected_for_txt(tmp_path: Path) -> None:
    path = _prompt_file(tmp_path, ["a cat"])
    with pytest.raises(ValueError, match="Remove column"):
        read_prompts(path, column="prompt")


def test_unknown_format_rejected(tmp_path: Path) -> None:
    path = _prompt_file(tmp_path, ["a cat"])
    with pytest.raises(ValueError, match="'yaml' is not one of"):
        read_prompts(path, file_format="yaml")


# Deduplication and categories


def test_duplicates_kept_by_default(tmp_path: Path) -> None:
    path = _prompt_file(tmp_path, ["a cat", "a dog", "a cat ", "A cat", "a dog"])
    assert _texts(read_prompts(path)) == ["a cat", "a dog", "a cat", "A cat", "a dog"]
    unique = read_prompts(path, deduplicate=True)
    assert _texts(unique) == ["a cat", "a dog", "A cat"]
    assert [record.line for record in unique] == [1, 2, 4]


def test_deduplicate_keeps_first_record() -> None:
    records = [
        PromptRecord("a cat", "f", 1, category="Animals"),
        PromptRecord("a cat", "f", 2, category="Pets"),
    ]
    assert deduplicate_prompts(records) == [records[0]]


def test_filter_categories_selects(tmp_path: Path) -> None:
    records = read_prompts(_write(tmp_path / "d.csv", DRAWBENCH_SAMPLE))
    selected = filter_categories(records, ["Text", "Gary Marcus et al. "])
    assert _texts(selected) == ['A sign that reads\n"hello".', "A horse riding an astronaut."]


def test_filter_unknown_category_lists_choices(tmp_path: Path) -> None:
    records = read_prompts(_write(tmp_path / "d.csv", DRAWBENCH_SAMPLE))
    with pytest.raises(ValueError, match=r"\['Colour'\].*Choose from: \['Colors'"):
        filter_categories(records, ["Colour"])
    assert filter_categories(records, ["Colour"], strict=False) == []


def test_filter_without_categories_rejected(tmp_path: Path) -> None:
    records = read_prompts(_prompt_file(tmp_path, ["a cat"]))
    with pytest.raises(ValueError, match="has no prompt categories"):
        filter_categories(records, ["Animals"])


# Data module


def _data_module(train_file: Path, **arguments) -> PromptDataModule:
    data = PromptDataModule(str(train_file), **arguments)
    data.setup("fit")
    return data


def _epoch_batches(data: PromptDataModule, epoch: int) -> list[list[str]]:
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_batches_are_prompt_strings(tmp_path: Path) -> None:
    train = _prompt_file(tmp_path, [f"prompt {index}" for index in range(10)])
    data = _data_module(train, batch_size=4)
    batches = list(data.train_dataloader())
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert all(isinstance(text, str) for batch in batches for text in batch)
    assert sorted(text for batch in batches for text in batch) == sorted(
        f"prompt {index}" for index in range(10)
    )
    assert data.val_dataloader() == []


def test_shuffle_reproducible_per_seed_epoch(tmp_path: Path) -> None:
    train = _prompt_file(tmp_path, [f"prompt {index}" for index in range(32)])
    first = _data_module(train, batch_size=8, seed=3)
    second = _data_module(train, batch_size=8, seed=3)
    other_seed = _data_module(train, batch_size=8, seed=4)
    assert _epoch_batches(first, 0) == _epoch_batches(second, 0)
    assert _epoch_batches(first, 5) == _epoch_batches(second, 5)
    assert _epoch_batches(first, 0) != _epoch_batches(first, 1)
    assert _epoch_batches(first, 0) != _epoch_batches(other_seed, 0)
    file_order = [
        [f"prompt {index}" for index in range(start, start + 8)] for start in (0, 8, 16, 24)
    ]
    assert _epoch_batches(first, 0) != file_order


def test_validation_keeps_file_order(tmp_path: Path) -> None:
    train = _prompt_file(tmp_path, ["a cat", "a dog"])
    val_texts = [f"held-out {index}" for index in range(7)]
    val = _prompt_file(tmp_path, val_texts, name="val.txt")
    data = _data_module(train, val_file=str(val), batch_size=3, seed=1)
    assert list(data.val_dataloader()) == [val_texts[0:3], val_texts[3:6], val_texts[6:7]]


def test_max_prompts_limits(tmp_path: Path) -> None:
    train = _prompt_file(tmp_path, [f"train {index}" for index in range(10)])
    val = _prompt_file(tmp_path, [f"val {index}" for index in range(10)], name="val.txt")
    data = _data_module(train, val_file=str(val), max_train_prompts=4, max_val_prompts=2)
    assert _texts(data.records["train"]) == [f"train {index}" for index in range(4)]
    assert _texts(data.records["val"]) == ["val 0", "val 1"]
    assert sum(len(batch) for batch in data.train_dataloader()) == 4


def test_limit_applies_after_deduplication(tmp_path: Path) -> None:
    train = _prompt_file(tmp_path, ["a cat", "a cat", "a dog", "a cat", "a bird"])
    data = _data_module(train, deduplicate=True, max_train_prompts=2)
    assert _texts(data.records["train"]) == ["a cat", "a dog"]
    assert len(_data_module(train).records["train"]) == 5


def test_module_category_filter(tmp_path: Path) -> None:
    train = _write(tmp_path / "parti.tsv", PARTI_SAMPLE)
    val = _write(
        tmp_path / "val.tsv", "Prompt\tCategory\na goat\tAnimals\na pear\tProduce & Plants\n"
    )
    data = _data_module(train, val_file=str(val), categories=["Animals", "Illustrations"])
    assert _texts(data.records["train"]) == ['"G I G G L E" painted as graffiti', "a cat on a mat"]
    # Illustrations occurs only in the training file, which is allowed.
    assert _texts(data.records["val"]) == ["a goat"]


def test_module_unknown_category_rejected(tmp_path: Path) -> None:
    train = _write(tmp_path / "parti.tsv", PARTI_SAMPLE)
    with pytest.raises(ValueError, match=r"\['Animal'\] occur in none.*'Animals'"):
        _data_module(train, categories=["Animal"])


def test_module_empty_split_rejected(tmp_path: Path) -> None:
    train = _write(tmp_path / "parti.tsv", PARTI_SAMPLE)
    val = _write(tmp_path / "val.tsv", "Prompt\tCategory\na goat\tAnimals\n")
    with pytest.raises(ValueError, match="No val prompts in .*val.tsv"):
        _data_module(train, val_file=str(val), categories=["Illustrations"])


def test_module_categories_need_category_format(tmp_path: Path) -> None:
    train = _prompt_file(tmp_path, ["a cat"])
    with pytest.raises(ValueError, match="the txt format has no categories"):
        PromptDataModule(str(train), file_format="txt", categories=["Animals"])
    with pytest.raises(ValueError, match="has no prompt categories"):
        _data_module(train, categories=["Animals"])


def test_overlap_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train = _prompt_file(tmp_path, ["a cat", "a dog"])
    val = _prompt_file(tmp_path, ["a dog", "a bird"], name="val.txt")
    with caplog.at_level(logging.WARNING, logger="datamodules.prompts"):
        _data_module(train, val_file=str(val))
    assert "1 of 2 validation prompts also occur in the training prompts" in caplog.text


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"max_train_prompts": 0}, "max_train_prompts=0"),
        ({"max_val_prompts": 0}, "max_val_prompts=0"),
        ({"file_format": "yaml"}, "file_format='yaml'"),
        ({"categories": []}, "categories is an empty list"),
        ({"categories": [" "]}, "non-empty strings"),
    ],
)
def test_invalid_arguments_rejected(arguments: dict, problem: str) -> None:
    with pytest.raises(ValueError, match="Invalid PromptDataModule arguments") as error:
        PromptDataModule("prompts.txt", **arguments)
    assert problem in str(error.value)


# Real files


@_requires(PARTI_FILE)
def test_parti_real_file() -> None:
    records = read_prompts(PARTI_FILE)
    assert len(records) == 1632
    assert len(deduplicate_prompts(records)) == 1632
    categories = Counter(record.category for record in records)
    assert len(categories) == 12
    assert categories["Animals"] == 314
    assert categories["Artifacts"] == 287
    assert categories["World Knowledge"] == 214
    assert len({record.challenge for record in records}) == 11
    graffiti = [record for record in records if "G I G G L E" in record.text]
    assert graffiti[0].text.startswith('"G I G G L E" painted')


@_requires(PARTI_FILE)
def test_parti_real_category_module() -> None:
    data = _data_module(PARTI_FILE, categories=["Animals", "Vehicles"], batch_size=64)
    assert len(data.records["train"]) == 314 + 104
    assert sum(len(batch) for batch in data.train_dataloader()) == 418


@_requires(DRAWBENCH_FILE)
def test_drawbench_real_file() -> None:
    records = read_prompts(DRAWBENCH_FILE)
    assert len(records) == 200
    categories = Counter(record.category for record in records)
    assert categories == {
        "Reddit": 38,
        "Colors": 25,
        "Text": 21,
        "DALL-E": 20,
        "Descriptions": 20,
        "Positional": 20,
        "Counting": 19,
        "Conflicting": 10,
        "Gary Marcus et al.": 10,
        "Misspellings": 10,
        "Rare Words": 7,
    }
    assert len(filter_categories(records, ["Gary Marcus et al."])) == 10


@_requires(REFL_FILE)
def test_refl_real_file() -> None:
    records = read_prompts(REFL_FILE)
    assert len(records) == 10000
    raw_texts = [item["text"] for item in json.loads(REFL_FILE.read_text(encoding="utf-8"))]
    assert len(set(raw_texts)) == 9803
    # Five more pairs differ only in surrounding whitespace, which reading strips.
    assert len(read_prompts(REFL_FILE, deduplicate=True)) == 9798
    assert records[0].line == 2
    assert records[1].line == 6


@_requires(BENCHMARK_FILE)
def test_imagereward_benchmark_real_file() -> None:
    assert len(read_prompts(BENCHMARK_FILE, column="prompt")) == 100
