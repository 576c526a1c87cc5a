"""ReFL: reward feedback learning for text-to-image diffusion (Xu et al., 2023, ImageReward).

One ReFL step, for a batch of prompts:

1. Sample from noise with DDIM (classifier-free guidance) without gradients, down to a
   step index t drawn uniformly from [``t1``, ``t2``] of the ``num_inference_steps``
   schedule (late steps, where the predicted image is already recognizable).
2. Run the UNet once more at step t with gradients, and take the predicted clean sample
   x0 = (x_t - sqrt(1 - abar_t) e) / sqrt(abar_t) (or the v-prediction form).
3. Decode x0 to pixels in [0, 1] and score it with the frozen reward model r.
4. Minimize ``reward_scale`` * mean(phi(r)) with phi(r) = ReLU(``reward_margin`` - r):
   rewards above the margin give no gradient, so the model is not pushed without limit
   toward what the reward model likes.

The gradient therefore reaches the UNet through the single step at t only. To keep the
model from drifting, ReFL adds the ordinary denoising loss on real image-caption pairs
with weight ``pretraining_weight`` (ImageReward's published code leaves this out).

Batches are mappings ``{"prompts": list[str], "pretraining": (images, captions)}``, the
second entry optional, as :class:`datamodules.text_image.ReFLDataModule` yields them.
"""

from __future__ import annotations

import peft
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.annotation import Annotator
from lightning_modules.adapters import BitFit
from lightning_modules.text_to_image import (
    DiffusionComponents,
    RewardedDiffusion,
    predicted_original,
)


class ReFL(RewardedDiffusion):
    """Reward feedback learning (see the module docstring).

    Args:
        components: the diffusion model to fine-tune, usually ``pretrained``.
        reward_model: directory of an exported VP-Score (``load_scorer``); it stays frozen.
        reward_weights: weights of the reward model's aspects in the reward r; None
            uses the reward model's overall score.
        t1: first step index (0-based, of ``num_inference_steps``) the grad step may take.
        t2: last such index, inclusive.
        reward_margin: phi(r) = ReLU(reward_margin - r).
        reward_scale: lambda, the weight of the reward loss.
        pretraining_weight: weight of the denoising loss on the ``pretraining`` batches.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        train_text_encoder: also train the text encoder.
        condition_dropout: empty-prompt probability in the denoising loss.
        peft: adapter for the UNet (LoRA on its attention projections is typical).
        max_prompt_length: maximum text tokens per prompt.
        num_inference_steps: DDIM steps of the ReFL sampling and of ``generate``.
        guidance_scale: classifier-free guidance weight for sampling.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        judge: an annotator independent of the reward model (for the digits, the digit
            classifier); validation logs its mean score per aspect as
            ``val/judge/<aspect>``. Reward hacking shows as a rising ``val/reward`` with
            a flat or falling judge.
    """

    def __init__(
        self,
        components: DiffusionComponents,
        reward_model: str,
        reward_weights: list[float] | None = None,
        t1: int = 30,
        t2: int = 39,
        reward_margin: float = 2.0,
        reward_scale: float = 1e-3,
        pretraining_weight: float = 1.0,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        train_text_encoder: bool = False,
        condition_dropout: float = 0.0,
        peft: peft.PeftConfig | BitFit | None = None,
        max_prompt_length: int = 77,
        num_inference_steps: int = 40,
        guidance_scale: float = 5.0,
        gradient_checkpointing: bool = False,
        judge: Annotator | None = None,
    ):
        if not 0 <= t1 <= t2 < num_inference_steps:
            raise ValueError(
                f"Invalid ReFL arguments: t1={t1} and t2={t2} must satisfy "
                f"0 <= t1 <= t2 < num_inference_steps={num_inference_steps}."
            )
        if reward_scale <= 0 or pretraining_weight < 0:
            raise ValueError(
                f"Invalid ReFL arguments: reward_scale={reward_scale} must be positive and "
                f"pretraining_weight={pretraining_weight} non-negative."
            )
        super().__init__(
            components,
            reward_model=reward_model,
            reward_weights=reward_weights,
            judge=judge,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            train_text_encoder=train_text_encoder,
            condition_dropout=condition_dropout,
            peft=peft,
            max_prompt_length=max_prompt_length,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            gradient_checkpointing=gradient_checkpointing,
        )
        # Recorded here as well, whatever the parent's save_hyperparameters collects.
        self.hparams.update(
            {
                "t1": t1,
                "t2": t2,
                "reward_margin": reward_margin,
                "reward_scale": reward_scale,
                "pretraining_weight": pretraining_weight,
            }
        )

    # ------------------------------------------------------------------ the ReFL step

    def reward_loss(self, rewards: Tensor) -> Tensor:
        """Return lambda * mean(ReLU(margin - r))."""
        return self.hparams.reward_scale * F.relu(self.hparams.reward_margin - rewards).mean()

    def sample_to_step(
        self, prompts: list[str], stop: int, seed: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Denoise from noise through steps 0 .. ``stop`` - 1 without gradients, then step ``stop`` with them.

        Returns (predicted x0 in model space, the latents x_t fed to the grad step, t).
        """
        scheduler = self.sampling_scheduler()
        text = self.encode_prompts(prompts)
        empty = self.encode_prompts([""] * len(prompts))
        guidance = self.hparams.guidance_scale
        with torch.no_grad():
            latents = self.initial_noise(len(prompts), seed) * scheduler.init_noise_sigma
            for timestep in scheduler.timesteps[:stop]:
                model_input = scheduler.scale_model_input(latents, timestep)
                output = self.guided_prediction(
                    model_input, timestep, text.detach(), empty.detach(), guidance
                )
                latents = scheduler.step(output, timestep, latents).prev_sample
        timestep = scheduler.timesteps[stop]
        model_input = scheduler.scale_model_input(latents, timestep)
        output = self.guided_prediction(model_input, timestep, text, empty, guidance)
        x0 = predicted_original(
            output,
            latents,
            timestep.expand(len(prompts)).to(latents.device),
            scheduler.alphas_cumprod,
            self.prediction_type,
        )
        return x0, latents, timestep

    def training_step(self, batch: dict, batch_index: int) -> Tensor:
        prompts = list(batch["prompts"])
        stop = int(torch.randint(self.hparams.t1, self.hparams.t2 + 1, ()).item())
        x0, _, _ = self.sample_to_step(prompts, stop)
        images = self.model_space_to_images(x0)
        rewards, scores = self.rewards(prompts, images)
        loss = self.reward_loss(rewards)
        size = len(prompts)
        self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=size)
        for column, aspect in enumerate(self.scorer.aspects):
            self.log(f"train/reward/{aspect}", scores[:, column].mean(), batch_size=size)
        self.log("train/reward_loss", loss, batch_size=size)

        pretraining = batch.get("pretraining")
        if pretraining is not None and self.hparams.pretraining_weight > 0:
            images, captions = pretraining
            denoising = self.denoising_loss(images, captions)
            self.log("train/pretraining_loss", denoising, batch_size=len(images))
            loss = loss + self.hparams.pretraining_weight * denoising
        self.log("train/loss", loss, batch_size=size)
        return loss
