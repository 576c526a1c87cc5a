"""Pools of text prompts for text-to-image fine-tuning (ReFL, DDPO) and evaluation.

File formats (``file_format``):

- ``txt``: one prompt per line. Blank lines and lines whose first non-blank character
  is ``#`` are skipped.
- ``parti``: the PartiPrompts TSV, tab-separated with the header
  ``Prompt<TAB>Category<TAB>Challenge<TAB>Note``. Quotes have no special meaning, so a
  ``"`` is part of the prompt (one PartiPrompts prompt starts with one). Category and
  Challenge are kept in :class:`PromptRecord`, and Note is ignored. Only the ``Prompt``
  column is required.
- ``drawbench``: the DrawBench CSV, comma-separated with the header ``Prompt,Category``
  and standard CSV quoting for prompts that contain commas. Category is kept.
- ``imagereward_refl``: ImageReward's ReFL prompt file, one JSON array of objects such
  as ``{"text": "a prompt", "image": "000044-0048"}``. The prompt is ``text``, and other
  keys are ignored.
- ``jsonl``: JSON Lines, one object per line with a ``prompt`` field.
- ``auto`` (default): chosen from the file extension, case-insensitively. ``.txt`` is
  ``txt``, ``.tsv`` is ``parti``, ``.csv`` is ``drawbench`` and ``.jsonl`` is ``jsonl``.
  For ``.json``, the first non-blank character decides: ``[`` is ``imagereward_refl``
  and ``{`` is ``jsonl``. Any other extension raises ValueError, so set ``file_format``
  for such a file.

``column`` names the prompt field or header column in every format except ``txt``, for
example ``column="prompt"`` for ImageReward's ``benchmark-prompts.json``, an array of
``{"id", "prompt"}``.

Each prompt is stripped of surrounding whitespace, and a prompt that is empty after
stripping is invalid. Category and Challenge values are stripped too: DrawBench's
category ``"Gary Marcus et al. "`` ends with a space and becomes ``"Gary Marcus et al."``.
Files are read as UTF-8, and a byte order mark is ignored in the txt, TSV and CSV formats.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

# NOTE: a private helper of image_preference, reused because it yields the line on which
# each JSON array item starts.
from datamodules.image_preference import _read_json_array
from datamodules.jsonl import DataValidationError, read_jsonl
from datamodules.loading import record_loader

log = logging.getLogger(__name__)

FILE_FORMATS = ("txt", "parti", "drawbench", "imagereward_refl", "jsonl")
CATEGORY_FORMATS = ("parti", "drawbench")
DEFAULT_COLUMNS = {
    "parti": "Prompt",
    "drawbench": "Prompt",
    "imagereward_refl": "text",
    "jsonl": "prompt",
}
_EXTENSION_FORMATS = {".txt": "txt", ".tsv": "parti", ".csv": "drawbench", ".jsonl": "jsonl"}
_JSON_WHITESPACE = " \t\r\n"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt, the file and 1-based line it was read from, and its benchmark labels.

    ``category`` is the Category column of PartiPrompts and DrawBench, and ``challenge``
    is PartiPrompts' Challenge column. Both are None for formats without them and for
    empty cells.
    """

    text: str
    path: str
    line: int
    category: str | None = None
    challenge: str | None = None

    @property
    def location(self) -> str:
        """``path:line``, as error messages write it."""
        return f"{self.path}:{self.line}"


def _read_text(path: Path) -> str:
    """Read ``path`` as UTF-8, dropping a byte order mark.

    Raises:
        FileNotFoundError: ``path`` does not exist; the message names the path tried.
        DataValidationError: the file is not valid UTF-8; the message names the line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file not found: {path.resolve()}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        line_start = data.rfind(b"\n", 0, error.start) + 1
        raise DataValidationError(
            path,
            line,
            "<line>",
            data[line_start : error.start + 20],
            f"invalid UTF-8 (byte 0x{data[error.start]:02x} at column {error.start - line_start + 1})",
            "save the file with UTF-8 encoding",
        ) from None


def detect_format(path: str | Path) -> str:
    """Return the format that ``file_format="auto"`` picks for ``path``.

    The rule is in the module docstring: the extension decides, and for ``.json`` the
    first non-blank character does.

    Raises:
        FileNotFoundError: a ``.json`` file does not exist.
        ValueError: the extension is not one of the known ones, or a ``.json`` file
            starts with neither ``[`` nor ``{``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _EXTENSION_FORMATS:
        return _EXTENSION_FORMATS[suffix]
    if suffix != ".json":
        raise ValueError(
            f"Cannot choose a prompt file format for {path}: the extension {suffix!r} is "
            f"not one of .txt, .tsv, .csv, .json, .jsonl. Rename the file or set "
            f"file_format to one of {', '.join(FILE_FORMATS)}."
        )
    content = _read_text(path).lstrip(_JSON_WHITESPACE)
    if content.startswith("["):
        return "imagereward_refl"
    if content.startswith("{"):
        return "jsonl"
    raise ValueError(
        f"Cannot choose a prompt file format for {path}: a .json file must start with '[' "
        f"(a JSON array, read as imagereward_refl) or '{{' (JSON Lines, read as jsonl), "
        f"but it starts with {content[:20]!r}. Fix the file or set file_format."
    )


def _check_prompt(path: Path, line: int, field: str, value: Any, fix: str) -> str:
    """Return ``value`` stripped, raising unless it is a non-empty string."""
    if not isinstance(value, str):
        raise DataValidationError(
            path,
            line,
            field,
            value,
            f"expected a string, got {type(value).__name__}",
            "store the prompt as a JSON string",
        )
    text = value.strip()
    if not text:
        raise DataValidationError(path, line, field, value, "empty prompt", fix)
    return text


def _read_txt(path: Path) -> list[PromptRecord]:
    records = []
    # newline=None splits at \n, \r\n and \r, as open() does in text mode.
    lines = io.StringIO(_read_text(path), newline=None)
    for line_number, line in enumerate(lines, start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            records.append(PromptRecord(text, str(path), line_number))
    return records


def _optional_cell(row: list[str], index: int | None) -> str | None:
    if index is None:
        return None
    return row[index].strip() or None


def _read_table(path: Path, file_format: str, column: str) -> list[PromptRecord]:
    """Read the PartiPrompts TSV (``parti``) or the DrawBench CSV (``drawbench``)."""
    if file_format == "parti":
        reader_options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
        separator = "tab"
        row_fix = "separate the fields with tabs, and keep tabs out of prompts"
        syntax_fix = "write plain tab-separated text"
    else:
        reader_options = {"delimiter": ",", "strict": True}
        separator = "comma"
        row_fix = 'put double quotes around a prompt that contains commas, e.g. "a red car, a blue bus",Colors'
        syntax_fix = (
            'quote a field that contains commas or line breaks, close every quote, and write a " '
            'inside a quoted field as ""'
        )
    content = _read_text(path)
    reader = csv.reader(io.StringIO(content, newline=""), **reader_options)

    header: list[str] | None = None
    header_line = 0
    prompt_index = 0
    category_index: int | None = None
    challenge_index: int | None = None
    records = []
    row_start = 1
    try:
        for row in reader:
            # A quoted CSV field may span lines, so a row starts on the line after the last
            # line of the previous row.
            line = row_start
            row_start = reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue

            if header is None:
                header = [name.strip() for name in row]
                header_line = line
                if column not in header:
                    raise DataValidationError(
                        path,
                        line,
                        column,
                        header,
                        "missing from the header",
                        f"start the file with a {separator}-separated header that contains "
                        f"{column!r}, or set column to the name of the prompt column",
                    )
                prompt_index = header.index(column)
                category_index = header.index("Category") if "Category" in header else None
                if file_format == "parti" and "Challenge" in header:
                    challenge_index = header.index("Challenge")
                continue

            if len(row) != len(header):
                raise DataValidationError(
                    path,
                    line,
                    "<row>",
                    row,
                    f"expected {len(header)} {separator}-separated fields "
                    f"({', '.join(header)}) as in the header on line {header_line}, "
                    f"got {len(row)}",
                    row_fix,
                )
            text = _check_prompt(
                path, line, column, row[prompt_index], "write a prompt or delete the row"
            )
            records.append(
                PromptRecord(
                    text,
                    str(path),
                    line,
                    category=_optional_cell(row, category_index),
                    challenge=_optional_cell(row, challenge_index),
                )
            )
    except csv.Error as error:
        # row_start is the first line of the row that failed to parse. readlines() splits
        # lines as the reader does.
        first_line = io.StringIO(content, newline="").readlines()[row_start - 1].rstrip("\r\n")
        raise DataValidationError(
            path,
            row_start,
            "<row>",
            first_line,
            f"invalid {separator}-separated row ({error})",
            syntax_fix,
        ) from None
    return records


def _read_json_array_prompts(path: Path, column: str) -> list[PromptRecord]:
    # _read_json_array raises a bare UnicodeDecodeError, so this check names the line first.
    _read_text(path)
    records = []
    for index, (line, item) in enumerate(_read_json_array(path)):
        if not isinstance(item, dict):
            raise DataValidationError(
                path,
                line,
                f"<record[{index}]>",
                item,
                f"expected a JSON object, got {type(item).__name__}",
                f'write each array item as an object such as {{"{column}": "a prompt"}}',
            )
        if column not in item:
            raise DataValidationError(
                path,
                line,
                f"{column}[{index}]",
                None,
                "missing",
                f"add {column!r} to every object (keys found: {sorted(item)}), or set "
                "column to the name of the prompt field",
            )
        text = _check_prompt(
            path,
            line,
            f"{column}[{index}]",
            item[column],
            "write a prompt or delete the object",
        )
        records.append(PromptRecord(text, str(path), line))
    return records


def _read_jsonl_prompts(path: Path, column: str) -> list[PromptRecord]:
    # read_jsonl raises a bare UnicodeDecodeError, so this check names the line first.
    _read_text(path)
    records = []
    for source in read_jsonl(path):
        if column not in source.data:
            raise source.error(
                column,
                None,
                "missing",
                f"add {column!r} to every record (keys found: {sorted(source.data)}), or set "
                "column to the name of the prompt field",
            )
        text = _check_prompt(
            path, source.line, column, source.data[column], "write a prompt or delete the line"
        )
        records.append(PromptRecord(text, str(path), source.line))
    return records


def deduplicate_prompts(records: Sequence[PromptRecord]) -> list[PromptRecord]:
    """Keep the first record of each prompt text, in file order.

    Texts are compared exactly (case-sensitive) after the whitespace stripping that
    reading does.
    """
    seen: set[str] = set()
    unique = []
    for record in records:
        if record.text not in seen:
            seen.add(record.text)
            unique.append(record)
    return unique


def read_prompts(
    path: str | Path,
    file_format: str = "auto",
    column: str | None = None,
    deduplicate: bool = False,
) -> list[PromptRecord]:
    """Read and validate the prompts of ``path``, in file order.

    Args:
        path: the prompt file.
        file_format: one of ``auto``, ``txt``, ``parti``, ``drawbench``,
            ``imagereward_refl``, ``jsonl`` (see the module docstring).
        column: the prompt field or header column. None uses the format's default
            (``Prompt``, ``text`` or ``prompt``). It must be None for ``txt``.
        deduplicate: keep only the first occurrence of each prompt text.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataValidationError: a prompt is empty or not a string, the prompt column or
            field is missing, a row has the wrong number of fields, the file is not
            valid JSON, CSV or UTF-8. The message names the file, the 1-based line, the
            field, the value and the fix.
        ValueError: the format is unknown or cannot be detected, ``column`` is set for
            ``txt``, or the file contains no prompts.
    """
    path = Path(path)
    if file_format == "auto":
        file_format = detect_format(path)
    if file_format not in FILE_FORMATS:
        raise ValueError(
            f"file_format={file_format!r} is not one of auto, {', '.join(FILE_FORMATS)}."
        )
    if file_format == "txt" and column is not None:
        raise ValueError(
            f"column={column!r} is set, but a txt prompt file has no columns: every "
            f"line of {path} is one prompt. Remove column."
        )
    if column is None and file_format != "txt":
        column = DEFAULT_COLUMNS[file_format]

    if file_format == "txt":
        records = _read_txt(path)
    elif file_format in CATEGORY_FORMATS:
        records = _read_table(path, file_format, column)
    elif file_format == "imagereward_refl":
        records = _read_json_array_prompts(path, column)
    else:
        records = _read_jsonl_prompts(path, column)

    if not records:
        raise ValueError(f"{path} contains no prompts (read as {file_format}).")
    return deduplicate_prompts(records) if deduplicate else records


def filter_categories(
    records: Sequence[PromptRecord], categories: Sequence[str], strict: bool = True
) -> list[PromptRecord]:
    """Keep the records whose category is one of ``categories``, in their order.

    Names are compared exactly (case-sensitive) after stripping surrounding whitespace.

    Raises:
        ValueError: no record has a category (only the ``parti`` and ``drawbench``
            formats have one), or, when ``strict``, a requested category occurs in no
            record. The message lists the categories found.
    """
    requested = {name.strip() for name in categories}
    found = {record.category for record in records if record.category is not None}
    source = records[0].path if records else "the prompt list"
    if not found:
        raise ValueError(
            f"{source} has no prompt categories, so categories={list(categories)} cannot "
            f"select prompts. Only the {' and '.join(CATEGORY_FORMATS)} formats have a "
            "Category column; remove categories or use such a file."
        )
    if strict and not requested <= found:
        raise ValueError(
            f"Categories {sorted(requested - found)} do not occur in {source}. "
            f"Choose from: {sorted(found)}."
        )
    return [record for record in records if record.category in requested]


class PromptDataModule(pl.LightningDataModule):
    """Prompt pools for text-to-image fine-tuning; batches are ``list[str]`` of prompts.

    File formats, selected by ``file_format`` (details in the module docstring):

    - ``txt``: one prompt per line; blank lines and ``#`` comment lines are skipped.
    - ``parti``: the PartiPrompts TSV (``Prompt``, ``Category``, ``Challenge``, ``Note``).
    - ``drawbench``: the DrawBench CSV (``Prompt``, ``Category``).
    - ``imagereward_refl``: ImageReward's ReFL file, a JSON array of
      ``{"text", "image"}`` objects.
    - ``jsonl``: JSON Lines with a ``prompt`` field.
    - ``auto``: by extension (``.txt``, ``.tsv``, ``.csv``, ``.jsonl``), and for
      ``.json`` by the first character (``[`` array, ``{`` JSON Lines).

    Each split is read, then filtered by ``categories``, then deduplicated, then cut to
    ``max_*_prompts``. Both files are read at the first ``setup`` call of any stage.
    The training loader reshuffles every epoch with the seed ``seed + epoch``. The
    validation loader keeps file order.

    Args:
        train_file: prompts for training.
        val_file: held-out prompts for validation; None skips validation.
        file_format: the format of both files; ``auto`` detects each file's own.
        batch_size: prompts per batch.
        num_workers: DataLoader worker processes.
        seed: shuffling seed (the epoch number is added each epoch).
        max_train_prompts: use only the first N training prompts (None: all). NOTE: the
            PartiPrompts and DrawBench files are sorted by category, so the first N come
            from the first categories; use ``categories`` to choose them.
        max_val_prompts: use only the first N validation prompts (None: all).
        deduplicate: keep only the first occurrence of each prompt text in each split.
        categories: keep only prompts of these categories (PartiPrompts and DrawBench;
            other formats raise). Every name must occur in the training or the
            validation file, and each split must keep at least one prompt.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        file_format: str = "auto",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        max_train_prompts: int | None = None,
        max_val_prompts: int | None = None,
        deduplicate: bool = False,
        categories: list[str] | None = None,
    ):
        super().__init__()
        categories = list(categories) if categories is not None else None
        self._check_arguments(
            file_format, batch_size, num_workers, max_train_prompts, max_val_prompts, categories
        )
        self.save_hyperparameters(
            {
                "train_file": train_file,
                "val_file": val_file,
                "file_format": file_format,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "seed": seed,
                "max_train_prompts": max_train_prompts,
                "max_val_prompts": max_val_prompts,
                "deduplicate": deduplicate,
                "categories": categories,
            }
        )
        self.records: dict[str, list[PromptRecord]] = {}

    @staticmethod
    def _check_arguments(
        file_format: str,
        batch_size: int,
        num_workers: int,
        max_train_prompts: int | None,
        max_val_prompts: int | None,
        categories: list[str] | None,
    ) -> None:
        problems = []
        if file_format != "auto" and file_format not in FILE_FORMATS:
            problems.append(
                f"file_format={file_format!r} must be one of auto, {', '.join(FILE_FORMATS)}"
            )
        if file_format != "auto" and file_format not in CATEGORY_FORMATS and categories:
            problems.append(
                f"categories={categories} is set, but the {file_format} format has no "
                f"categories; use {' or '.join(CATEGORY_FORMATS)}, or remove categories"
            )
        if batch_size < 1:
            problems.append(f"batch_size={batch_size} must be at least 1")
        if num_workers < 0:
            problems.append(f"num_workers={num_workers} must be 0 or more")
        for name, value in (
            ("max_train_prompts", max_train_prompts),
            ("max_val_prompts", max_val_prompts),
        ):
            if value is not None and value < 1:
                problems.append(f"{name}={value} must be at least 1, or None for all")
        if categories is not None and not categories:
            problems.append("categories is an empty list; name at least one, or use None for all")
        if categories is not None and any(
            not isinstance(name, str) or not name.strip() for name in categories
        ):
            problems.append(f"categories={categories} must contain non-empty strings only")
        if problems:
            raise ValueError("Invalid PromptDataModule arguments: " + "; ".join(problems) + ".")

    def _select(
        self, split: str, records: list[PromptRecord], limit: int | None
    ) -> list[PromptRecord]:
        hparams = self.hparams
        if hparams.categories is not None:
            records = filter_categories(records, hparams.categories, strict=False)
            if not records:
                raise ValueError(
                    f"No {split} prompts in {hparams[f'{split}_file']} belong to "
                    f"categories={hparams.categories}."
                )
        if hparams.deduplicate:
            records = deduplicate_prompts(records)
        return records[:limit] if limit is not None else records

    def _load(self) -> None:
        hparams = self.hparams
        files = {"train": hparams.train_file}
        if hparams.val_file:
            files["val"] = hparams.val_file
        read_records = {
            split: read_prompts(path, hparams.file_format) for split, path in files.items()
        }

        if hparams.categories is not None:
            for records in read_records.values():
                # Raises for a file without categories, before the name check below.
                filter_categories(records, hparams.categories, strict=False)
            found = {record.category for records in read_records.values() for record in records}
            unknown = sorted({name.strip() for name in hparams.categories} - found)
            if unknown:
                raise ValueError(
                    f"Categories {unknown} occur in none of {list(files.values())}. "
                    f"Choose from: {sorted(name for name in found if name is not None)}."
                )

        limits = {"train": hparams.max_train_prompts, "val": hparams.max_val_prompts}
        for split, records in read_records.items():
            self.records[split] = self._select(split, records, limits[split])
            log.info(
                "Using %d of the %d %s prompts read from %s.",
                len(self.records[split]),
                len(records),
                split,
                files[split],
            )

        if "val" in self.records:
            train_texts = {record.text for record in self.records["train"]}
            overlap = sum(record.text in train_texts for record in self.records["val"])
            if overlap:
                log.warning(
                    "%d of %d validation prompts also occur in the training prompts.",
                    overlap,
                    len(self.records["val"]),
                )

    def setup(self, stage: str) -> None:
        if not self.records:
            self._load()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hparams = self.hparams
        texts = [record.text for record in self.records[split]]
        return record_loader(texts, hparams.batch_size, shuffle, hparams.seed, hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if "val" in self.records else []
