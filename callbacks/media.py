"""Weights & Biases media logging that does nothing under other loggers.

Methods call these helpers unconditionally; with a CSV or TensorBoard logger, or no
logger, they return without logging, so a config can switch loggers freely.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


def _wandb_loggers(trainer: pl.Trainer | None) -> list[Any]:
    if trainer is None:
        return []
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_table(
    trainer: pl.Trainer | None, key: str, columns: list[str], rows: Sequence[Sequence[Any]]
) -> bool:
    """Log a table of samples to every W&B logger of ``trainer``; return whether any logged."""
    loggers = _wandb_loggers(trainer)
    for logger in loggers:
        logger.log_table(
            key=key, columns=columns, data=[list(row) for row in rows], step=trainer.global_step
        )
    if not loggers:
        log.debug("No W&B logger; table %s not logged", key)
    return bool(loggers)


def log_image_grid(
    trainer: pl.Trainer | None,
    key: str,
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    nrow: int = 8,
) -> bool:
    """Log ``images`` (``[N, C, H, W]``, values in [0, 1]) as one grid image to W&B.

    Returns whether any logger received it. Captions, when given, are joined into the
    grid's caption in row-major order.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    loggers = _wandb_loggers(trainer)
    if not loggers:
        log.debug("No W&B logger; image grid %s not logged", key)
        return False
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow)
    caption = " | ".join(captions) if captions else None
    for logger in loggers:
        logger.log_image(
            key=key, images=[grid], caption=[caption] if caption else None, step=trainer.global_step
        )
    return True
