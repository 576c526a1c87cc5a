"""Writing ``predict`` outputs as JSON Lines."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from callbacks.run_config import run_directory
from datamodules.jsonl import write_jsonl

log = logging.getLogger(__name__)


class JsonlPredictionWriter(BasePredictionWriter):
    """Write the records returned by ``predict_step`` (lists of dicts) to a JSON Lines file.

    Args:
        output_file: where to write; defaults to ``<run directory>/predictions.jsonl``.
            With several processes, rank r writes ``<stem>.rank<r>.jsonl`` instead.

    Modules whose ``predict_step`` returns something other than a list of dicts are
    left alone, so the callback can stay in every run.
    """

    def __init__(self, output_file: str | None = None):
        super().__init__(write_interval="epoch")
        self.output_file = output_file

    def _path(self, trainer: pl.Trainer) -> Path:
        path = (
            Path(self.output_file)
            if self.output_file
            else run_directory(trainer) / "predictions.jsonl"
        )
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        records = _flatten_records(predictions)
        if not records:
            return
        path = self._path(trainer)
        write_jsonl(path, records)
        log.info("Wrote %d predictions to %s", len(records), path)


def _flatten_records(predictions: Any) -> list[dict] | None:
    """Flatten nested lists (per dataloader, per batch) of dicts; None if anything else is there."""
    records: list[dict] = []
    for item in predictions:
        if isinstance(item, dict):
            records.append(item)
        elif isinstance(item, list):
            nested = _flatten_records(item)
            if nested is None:
                return None
            records += nested
        else:
            return None
    return records
