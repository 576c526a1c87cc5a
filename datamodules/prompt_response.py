"""Prompt/response records for supervised fine-tuning, unlearning and preference methods.

Record schema: one JSON object per line with a prompt field and a response field. The
defaults are ``question`` and ``answer``, the TOFU names, and ``prompt``/``response`` or
any other pair is chosen by argument. A line may instead hold a JSON array of such
objects: TOFU's published files are chunked exports with one array per line, and a file
with a single array on one line is plain JSON. Blank lines are ignored. Other fields
are kept in ``PromptResponse.extra`` (for example TOFU's ``paraphrased_answer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from datamodules.jsonl import DataValidationError, read_json_lines
from datamodules.loading import record_loader


@dataclass
class PromptResponse:
    """One prompt with its reference response, and where it was read from."""

    prompt: str | list[dict[str, str]]  # a text, or chat messages ending with a user turn
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
    records: list[PromptResponse] = []
    layout = "one JSON object, or one JSON array of objects, per line"
    for line_number, data in read_json_lines(path, layout):
        if isinstance(data, list):
            for index, item in enumerate(data):
                records.append(
                    _parse_object(
                        path, line_number, f"[{index}]", item, prompt_field, response_field
                    )
                )
        else:
            records.append(_parse_object(path, line_number, "", data, prompt_field, response_field))
    if not records:
        raise ValueError(f"{path} contains no records; expected prompt/response objects.")
    return records


class PromptResponseDataModule(pl.LightningDataModule):
    """Prompt/response files for fine-tuning; batches are lists of :class:`PromptResponse`.

    Args:
        train_file: training records (see the module docstring for the format), or a
            list of such files, read in order and concatenated.
        val_file: validation records; None skips validation.
        prompt_field: name of the prompt field.
        response_field: name of the response field.
        batch_size: records per batch.
        num_workers: DataLoader worker processes.
        seed: shuffling seed (the epoch number is added each epoch).
        max_train_records: use only the first N training records (None: all).
    """

    def __init__(
        self,
        train_file: str | list[str],
        val_file: str | None = None,
        prompt_field: str = "question",
        response_field: str = "answer",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        max_train_records: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1.")
        if max_train_records is not None and max_train_records < 1:
            raise ValueError(
                f"max_train_records={max_train_records} must be at least 1, or None for all."
            )
        self.save_hyperparameters()
        self.splits: dict[str, list[PromptResponse]] = {}

    def _read(self, path: str) -> list[PromptResponse]:
        return read_prompt_response(path, self.hparams.prompt_field, self.hparams.response_field)

    def setup(self, stage: str) -> None:
        if stage == "fit" and "train" not in self.splits:
            files = self.hparams.train_file
            files = [files] if isinstance(files, str) else list(files)
            if not files:
                raise ValueError("train_file is an empty list; give at least one file.")
            records = [record for path in files for record in self._read(path)]
            limit = self.hparams.max_train_records
            self.splits["train"] = records[:limit] if limit is not None else records
        if stage in ("fit", "validate") and self.hparams.val_file and "val" not in self.splits:
            self.splits["val"] = self._read(self.hparams.val_file)

    def train_dataloader(self) -> DataLoader:
        hparams = self.hparams
        return record_loader(
            self.splits["train"], hparams.batch_size, True, hparams.seed, hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.splits:
            return []
        hparams = self.hparams
        return record_loader(
            self.splits["val"], hparams.batch_size, False, hparams.seed, hparams.num_workers
        )
