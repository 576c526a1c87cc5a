"""Samples of text-to-image models during training, as W&B image grids and scores."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch

from callbacks.media import log_image_grid
from datamodules.annotation import Annotator

log = logging.getLogger(__name__)


class SampleGrid(pl.Callback):
    """Sample fixed prompts with fixed noise after validation and log the grid and scores.

    The module needs ``generate(prompts, seed, num_inference_steps, guidance_scale)``
    returning images [B, 3, H, W] in [0, 1], as ``TextToImageDiffusion`` has. The same
    seed gives every evaluation the same starting noise, so grids of successive epochs
    show the model's progress and nothing else.

    Args:
        prompts: the prompts to sample, one image each.
        every_n_epochs: sample after every n-th validation epoch.
        seed: seed of the starting noise.
        num_inference_steps: sampling steps; None uses the module's setting.
        guidance_scale: classifier-free guidance weight; None uses the module's setting.
        annotator: an annotator (``datamodules.annotation.Annotator``). Its mean score
            per aspect over the samples is logged as ``val/samples/<aspect>``. The digit
            classifier is one: it judges generated digits independently of training.
    """

    def __init__(
        self,
        prompts: list[str],
        every_n_epochs: int = 1,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        annotator: Annotator | None = None,
    ):
        if not prompts:
            raise ValueError("SampleGrid needs at least one prompt.")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be at least 1.")
        self.prompts = list(prompts)
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.annotator = annotator

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        images = pl_module.generate(
            self.prompts,
            seed=self.seed,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
        )
        if trainer.is_global_zero:
            log_image_grid(trainer, "val/samples", images, captions=self.prompts)
        if self.annotator is None:
            return
        scores = self.annotator.annotate(self.prompts, images.detach().float().cpu())
        for aspect, values in scores.items():
            pl_module.log(f"val/samples/{aspect}", torch.nanmean(values.float()), sync_dist=True)
