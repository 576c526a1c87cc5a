"""A console summary of validation metrics after each validation run."""

from __future__ import annotations

import logging

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class ValidationReport(pl.Callback):
    """Log the ``val/`` metrics of each validation run as one line (skips the sanity check).

    Args:
        prefix: only metrics whose name starts with this are reported.
    """

    def __init__(self, prefix: str = "val/"):
        self.prefix = prefix

    def _report(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(self.prefix) and value.numel() == 1
        }
        if values:
            shown = "  ".join(f"{name}={value:.4f}" for name, value in sorted(values.items()))
            log.info("epoch %d step %d: %s", trainer.current_epoch, trainer.global_step, shown)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer)
