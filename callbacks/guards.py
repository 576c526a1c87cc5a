"""Training guards: stop on a non-finite loss before it reaches the weights."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(pl.Callback):
    """Raise :class:`NonFiniteLossError` when the training loss is NaN or infinite.

    The check runs before ``backward``, so the optimizer never applies the bad step and
    the weights (and every checkpoint already written) stay as they were. Lightning
    writes no checkpoint when fit ends with an exception, so the last good ``.ckpt``
    is left intact and training can resume from it after the cause is fixed.
    """

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        value = loss.detach().float().item()
        if math.isfinite(value):
            return
        raise NonFiniteLossError(
            f"training loss is {value} at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1}). "
            "The optimizer step was skipped and the checkpoints on disk were not touched. "
            "Lower the learning rate, enable gradient clipping (trainer.gradient_clip_val) or "
            "switch to 32-bit precision, then resume with --ckpt_path pointing at the last checkpoint."
        )
