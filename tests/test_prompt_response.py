"""Prompt/response reading: object lines, array lines, TOFU files and invalid input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.jsonl import DataValidationError
from datamodules.prompt_response import PromptResponseDataModule, read_prompt_response
from tests.conftest import REPO_ROOT

TOFU_DIR = REPO_ROOT.parent / "shared" / "data" / "tofu"
requires_tofu = pytest.mark.skipif(
    not TOFU_DIR.is_dir(), reason=f"TOFU data not found at {TOFU_DIR}"
)


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_object_and_array_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "data.json",
        json.dumps({"question": "Q1?", "answer": "A1.", "source": "x"}),
        "",
        json.dumps([{"question": "Q2?", "answer": "A2."}, {"question": "Q3?", "answer": "A3."}]),
    )
    records = read_prompt_response(path)
    assert [record.prompt for record in records] == ["Q1?", "Q2?", "Q3?"]
    assert [record.response for record in records] == ["A1.", "A2.", "A3."]
    assert records[0].extra == {"source": "x"}
    assert records[2].location == f"{path}:3[1]"


def test_custom_field_names(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", json.dumps({"prompt": "Hi", "response": "Hello"}))
    records = read_prompt_response(path, prompt_field="prompt", response_field="response")
    assert (records[0].prompt, records[0].response) == ("Hi", "Hello")


@pytest.mark.parametrize(
    ("line", "field", "shown"),
    [
        (json.dumps({"question": "Q?"}), "answer", "None"),
        (json.dumps({"question": "Q?", "answer": ""}), "answer", "''"),
        (json.dumps({"question": 7, "answer": "A."}), "question", "7"),
        (json.dumps([{"question": "Q?", "answer": "A."}, {"answer": "A."}]), "question[1]", "None"),
        (json.dumps([{"question": "Q?", "answer": "A."}, "text"]), "<record[1]>", "'text'"),
        ('{"question": "Q?", "answer": ', "<line>", "answer"),
    ],
)
def test_invalid_record_names_location(tmp_path: Path, line: str, field: str, shown: str) -> None:
    path = _write(tmp_path / "bad.json", json.dumps({"question": "Q?", "answer": "A."}), line)
    with pytest.raises(DataValidationError) as error:
        read_prompt_response(path)
    message = str(error.value)
    assert f"{path}:2:" in message
    assert f"field {field!r}" in message
    assert shown in message
    assert "Fix:" in message


def test_empty_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contains no records"):
        read_prompt_response(_write(tmp_path / "empty.json", ""))


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_prompt_response(tmp_path / "missing.json")


@requires_tofu
def test_tofu_counts_and_splits() -> None:
    full = read_prompt_response(TOFU_DIR / "full.json")
    forget10 = read_prompt_response(TOFU_DIR / "forget10.json")
    retain90 = read_prompt_response(TOFU_DIR / "retain90.json")
    assert len(full) == 4000
    assert len(forget10) == 400
    assert len(retain90) == 3600
    # forget10 is the last 10% of full.json and retain90 the rest, in order.
    assert [(r.prompt, r.response) for r in full[-400:]] == [
        (r.prompt, r.response) for r in forget10
    ]
    assert [(r.prompt, r.response) for r in full[:3600]] == [
        (r.prompt, r.response) for r in retain90
    ]
    # full.json is four array lines of at most 1000 records.
    assert full[3999].location.endswith(":4[999]")


@requires_tofu
def test_tofu_perturbed_fields_kept() -> None:
    records = read_prompt_response(TOFU_DIR / "forget01_perturbed.json")
    assert len(records) == 40
    assert len(records[0].extra["perturbed_answer"]) == 5
    assert isinstance(records[0].extra["paraphrased_question"], str)


def test_several_training_files_are_read_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text('{"question": "q1?", "answer": "a1."}\n')
    second.write_text(
        '[{"question": "q2?", "answer": "a2."}, {"question": "q3?", "answer": "a3."}]\n'
    )
    data = PromptResponseDataModule([str(first), str(second)], max_train_records=2)
    data.setup("fit")
    assert [record.prompt for record in data.splits["train"]] == ["q1?", "q2?"]
    with pytest.raises(ValueError, match="empty list"):
        PromptResponseDataModule([]).setup("fit")
