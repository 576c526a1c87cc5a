"""Prompt/response records for supervised fine-tuning, unlearning and preference methods.

Record schema: one JSON object per line with a prompt field and a response field. The
defaults are ``question`` and ``answer``, the TOFU names, and ``prompt``/``response`` or
any other pair is chosen by argument. A line may instead hold a JSON array of such
objects: TOFU's published files are chunked exports with one array per line, and a file
with a single array on one line is plain JSON. Blank lines are ignored. Other fields
are kept in ``PromptResponse.extra`` (for example TOFU's ``paraphrased_answer``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.jsonl import DataValidationError


@dataclass(frozen=True)
class PromptResponse:
    """One prompt with its reference response, and where it was read from."""

    prompt: str
    response: str
    location: str
    extra: dict[str, Any] = field(default_factory=dict)


def _parse_object(
    path: Path, line: int, position: str, item: Any, prompt_field: str, response_field: str
) -> PromptResponse:
    if not isinstance(item, dict):
        raise DataValidationError(
            path,
            line,
            f"<record{position}>",
            item,
            f"expected a JSON object, got {type(item).__name__}",
            "write each record as an object with prompt and response fields",
        )
    values = {}
    for name in (prompt_field, response_field):
        value = item.get(name)
        if value is None:
            raise DataValidationError(
                path,
                line,
                f"{name}{position}",
                None,
                "missing",
                f"add {name!r} to every record (keys found: {sorted(item)}), or choose the "
                "field names with prompt_field / response_field",
            )
        if not isinstance(value, str) or not value.strip():
            raise DataValidationError(
                path,
                line,
                f"{name}{position}",
                value,
                "expected a non-empty string",
                "store the text as a JSON string",
            )
        values[name] = value
    extra = {key: value for key, value in item.items() if key not in (prompt_field, response_field)}
    return PromptResponse(
        values[prompt_field], values[response_field], f"{path}:{line}{position}", extra
    )


def read_prompt_response(
    path: str | Path, prompt_field: str = "question", response_field: str = "answer"
) -> list[PromptResponse]:
    """Read and validate every record of ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataValidationError: a line is not JSON, or a record lacks a field or has a
            non-string or empty value. The message names the file, the 1-based line, the
            field (with ``[i]`` for the i-th record of an array line) and the value.
        ValueError: the file contains no records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt/response file not found: {path.resolve()}")
    records: list[PromptResponse] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataValidationError(
                    path,
                    line_number,
                    "<line>",
                    text.strip(),
                    f"invalid JSON ({error.msg} at column {error.colno})",
                    "write one JSON object, or one JSON array of objects, per line",
                ) from None
            if isinstance(data, list):
                for index, item in enumerate(data):
                    records.append(
                        _parse_object(
                            path, line_number, f"[{index}]", item, prompt_field, response_field
                        )
                    )
            else:
                records.append(
                    _parse_object(path, line_number, "", data, prompt_field, response_field)
                )
    if not records:
        raise ValueError(f"{path} contains no records; expected prompt/response objects.")
    return records
