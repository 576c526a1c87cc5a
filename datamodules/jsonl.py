"""JSON Lines reading with errors that point at the offending record.

Every data module in paperlab reads JSON Lines: one JSON object per line, blank lines
ignored. A record that fails validation raises :class:`DataValidationError`, whose
message names the file, the 1-based line number, the field, the value and the fix.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAX_VALUE_CHARS = 120


class DataValidationError(ValueError):
    """An invalid input record; the message gives its location and the fix."""

    def __init__(self, path: str | Path, line: int, field: str, value: Any, problem: str, fix: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.value = value
        shown = repr(value)
        if len(shown) > _MAX_VALUE_CHARS:
            shown = shown[: _MAX_VALUE_CHARS - 3] + "..."
        super().__init__(f"{self.path}:{line}: field {field!r} = {shown}: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class JsonlRecord:
    """One parsed line: the object plus where it came from, for error messages."""

    path: Path
    line: int
    data: dict[str, Any]

    def error(self, field: str, value: Any, problem: str, fix: str) -> DataValidationError:
        """Build a :class:`DataValidationError` located at this record."""
        return DataValidationError(self.path, self.line, field, value, problem, fix)

    def require(self, field: str, expected_type: type | tuple[type, ...]) -> Any:
        """Return ``data[field]``, raising if it is missing or not of ``expected_type``."""
        if field not in self.data:
            raise self.error(
                field,
                None,
                "missing",
                f"add {field!r} to every record (keys found: {sorted(self.data)})",
            )
        value = self.data[field]
        if not isinstance(value, expected_type):
            names = (
                expected_type.__name__
                if isinstance(expected_type, type)
                else " or ".join(t.__name__ for t in expected_type)
            )
            raise self.error(
                field, value, f"expected {names}, got {type(value).__name__}", f"store a {names}"
            )
        return value


def read_json_lines(
    path: str | Path, layout: str = "one JSON object per line"
) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed value)`` for each non-blank line of ``path``.

    ``layout`` describes the expected content and goes into the fix of error messages.
    A path ending in ``.gz`` is read through gzip.

    Raises:
        FileNotFoundError: ``path`` does not exist; the message names the path tried.
        DataValidationError: a line is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON Lines file not found: {path.resolve()}")
    opened = (
        gzip.open(path, "rt", encoding="utf-8")
        if path.suffix == ".gz"
        else path.open(encoding="utf-8")
    )
    with opened as handle:
        for line_number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield line_number, json.loads(text)
            except json.JSONDecodeError as error:
                raise DataValidationError(
                    path,
                    line_number,
                    "<line>",
                    text.strip(),
                    f"invalid JSON ({error.msg} at column {error.colno})",
                    f"write {layout}",
                ) from None


def read_jsonl(path: str | Path) -> Iterator[JsonlRecord]:
    """Yield the records of a JSON Lines file.

    Raises:
        FileNotFoundError: ``path`` does not exist; the message names the path tried.
        DataValidationError: a line is not valid JSON or not a JSON object.
    """
    path = Path(path)
    for line_number, data in read_json_lines(path, "one complete JSON object per line"):
        if not isinstance(data, dict):
            raise DataValidationError(
                path,
                line_number,
                "<line>",
                data,
                f"expected a JSON object, got {type(data).__name__}",
                "write one JSON object ({...}) per line",
            )
        yield JsonlRecord(path, line_number, data)


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` as JSON Lines, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    temporary.replace(path)
