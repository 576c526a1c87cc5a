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

    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow)  # [C, H', W']
    # wandb.Image writes a float tensor's values as 8-bit levels without scaling, so
    # [0, 1] comes out black. It gets 8-bit pixels in height x width x channels order.
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    caption = " | ".join(captions) if captions else None
    # Lightning's log_image takes per-image lists and rejects caption=None.
    extra = {"caption": [caption]} if caption else {}
    for logger in loggers:
        logger.log_image(key=key, images=[pixels], step=trainer.global_step, **extra)
    return True
