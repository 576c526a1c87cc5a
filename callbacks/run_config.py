"""Saving the resolved LightningCLI config next to each run's checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback


def run_directory(trainer: pl.Trainer) -> Path:
    """Return the directory of this run, ``<save_dir>/<name>/<version>``, where checkpoints go.

    This is the layout ``ModelCheckpoint`` uses for its ``checkpoints/`` folder, so the
    saved config sits beside the checkpoints of the same run, and a second run never
    overwrites the first one's config.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(save_dir) / str(logger.name) / version


class SaveRunConfig(SaveConfigCallback):
    """Write ``config.yaml`` (the fully resolved config) into :func:`run_directory`."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        directory = trainer.strategy.broadcast(
            run_directory(trainer) if trainer.is_global_zero else None
        )
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / self.config_filename
            temporary = directory / f".{self.config_filename}.tmp"
            self.parser.save(
                self.config, str(temporary), skip_none=False, overwrite=True, multifile=False
            )
            os.replace(temporary, path)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
