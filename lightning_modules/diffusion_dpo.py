"""Diffusion-DPO: direct preference optimization of a text-to-image diffusion model
(Wallace et al., 2023).

Take a prompt c with a preferred image x_w and a dispreferred image x_l. One timestep t
and one noise e noise both images, and the loss compares the denoising errors of the
policy and of the frozen reference (the starting model):

    d_theta = ||e - e_theta(x_w,t)||^2 - ||e - e_theta(x_l,t)||^2
    d_ref   = ||e - e_ref(x_w,t)||^2   - ||e - e_ref(x_l,t)||^2
    loss    = -log sigmoid(-beta / 2 * (d_theta - d_ref))

with each squared error the mean over the sample's elements (and e replaced by the
v target for v-prediction models). This is the paper's objective with its constant
factor T folded into ``beta``, as the authors' code does. The implicit reward of an image
is r = -beta / 2 * (err_theta - err_ref); the diagnostics log r of the preferred and
dispreferred images, their margin (the argument of the sigmoid) and the fraction of
pairs with a positive margin, under the keys the text DPO module uses.

When the UNet carries peft adapter layers (LoRA, LoHa, LoKr, IA3), the reference is the
policy with its adapter switched off. Otherwise (full fine-tuning or BitFit) it is a
frozen copy of the starting UNet, which costs a second UNet in memory.

Pairs come from either source:

- ``pairs_from="data"``: :class:`datamodules.image_preference.PreferenceBatch` batches of
  the VP-Score data format. Every two images of a prompt whose combined rating differs
  form a pair (the combined rating is ``rating_weights`` applied to the aspect ratings,
  or their mean), at most ``max_pairs_per_prompt`` of them per prompt, drawn at random.
- ``pairs_from="samples"``: on-policy, through
  :class:`datamodules.rollouts.RolloutDataModule`. Each epoch samples
  ``samples_per_prompt`` images for each of ``prompts_per_epoch`` prompts, scores them
  with the reward model, and pairs the best with the worst of each prompt; then trains
  ``inner_epochs`` passes over those pairs.

The Diffusion-DPO loss is a few lines on top of the denoising loss; diffusers ships it
only inside an example training script, so it is written here and tested against the
formula above.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any, Literal

import peft
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.annotation import Annotator
from datamodules.image_preference import PreferenceBatch
from lightning_modules.adapters import BitFit, adapters_disabled, has_switchable_adapter
from lightning_modules.metrics.preference import preference_pairs
from lightning_modules.text_to_image import DiffusionComponents, RewardedDiffusion


def diffusion_dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Compute the Diffusion-DPO loss from per-pair denoising errors (each [P]).

    Returns the mean loss and the diagnostics ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins`` and ``rewards/accuracies`` (means over pairs).
    """
    chosen = -0.5 * beta * (policy_chosen - reference_chosen)
    rejected = -0.5 * beta * (policy_rejected - reference_rejected)
    margins = chosen - rejected
    loss = -F.logsigmoid(margins).mean()
    with torch.no_grad():
        diagnostics = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
        }
    return loss, diagnostics


def pairs_from_ratings(
    batch: PreferenceBatch,
    rating_weights: list[float] | None = None,
    max_pairs_per_prompt: int | None = None,
) -> tuple[list[str], Tensor, Tensor]:
    """Return (prompts [P], preferred indices [P], dispreferred indices [P]) into ``batch.images``.

    The combined rating of an image is ``ratings @ rating_weights``, or the mean of its
    rated aspects when ``rating_weights`` is None. Images without any rating form no
    pair, and with ``rating_weights`` neither do images missing the rating of any aspect
    (NaN times a weight, even 0, is NaN). With ``max_pairs_per_prompt``, that many pairs per prompt are drawn at random
    (torch's global generator).
    """
    ratings = batch.ratings
    if rating_weights is None:
        combined = ratings.nanmean(dim=1)
    else:
        if len(rating_weights) != ratings.shape[1]:
            raise ValueError(
                f"rating_weights={rating_weights} has {len(rating_weights)} entries for the "
                f"data's aspects {list(batch.aspects)}; give one weight per aspect."
            )
        combined = ratings @ ratings.new_tensor(rating_weights)
    preferred, dispreferred = preference_pairs(combined, batch.group).nonzero(as_tuple=True)
    if max_pairs_per_prompt is not None:
        keep = []
        for group in batch.group[preferred].unique().tolist():
            rows = (batch.group[preferred] == group).nonzero().flatten()
            keep.append(rows[torch.randperm(len(rows))[:max_pairs_per_prompt]])
        keep = torch.cat(keep).sort().values if keep else preferred.new_zeros(0)
        preferred, dispreferred = preferred[keep], dispreferred[keep]
    prompts = [batch.prompts[group] for group in batch.group[preferred].tolist()]
    return prompts, preferred, dispreferred


class DiffusionDPO(RewardedDiffusion):
    """Diffusion-DPO (see the module docstring).

    Args:
        components: the diffusion model to fine-tune; it is also the reference.
        beta: the KL weight beta (the paper uses 5000 for Stable Diffusion 1.5).
        pairs_from: ``"data"`` (preference batches) or ``"samples"`` (the model's own
            samples ranked by the reward model).
        reward_model: exported VP-Score; needed for ``pairs_from="samples"``, and scored
            at validation when given.
        reward_weights: weights of the reward model's aspects; None uses its overall score.
        rating_weights: weights of the data's aspect ratings; None takes their mean.
        max_pairs_per_prompt: cap on the pairs drawn from one prompt's images (data).
        prompts_per_epoch: prompts sampled per epoch (samples).
        samples_per_prompt: images sampled per prompt, of which the best and the worst
            form the pair (samples).
        sample_batch_size: images per sampling batch (samples).
        train_batch_size: pairs per training batch (samples).
        inner_epochs: passes over each epoch's pairs (samples).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        peft: adapter for the UNet; with LoRA the reference needs no copy.
        max_prompt_length: maximum text tokens per prompt.
        num_inference_steps: DDIM steps of sampling and of ``generate``.
        guidance_scale: classifier-free guidance weight of sampling.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        judge: an annotator independent of the reward, scored at validation.
    """

    def __init__(
        self,
        components: DiffusionComponents,
        beta: float = 5000.0,
        pairs_from: Literal["data", "samples"] = "data",
        reward_model: str | None = None,
        reward_weights: list[float] | None = None,
        rating_weights: list[float] | None = None,
        max_pairs_per_prompt: int | None = None,
        prompts_per_epoch: int = 64,
        samples_per_prompt: int = 4,
        sample_batch_size: int = 16,
        train_batch_size: int = 8,
        inner_epochs: int = 1,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        peft: peft.PeftConfig | BitFit | None = None,
        max_prompt_length: int = 77,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        gradient_checkpointing: bool = False,
        judge: Annotator | None = None,
    ):
        if beta <= 0:
            raise ValueError(f"Invalid DiffusionDPO arguments: beta={beta} must be positive.")
        if pairs_from not in ("data", "samples"):
            raise ValueError(
                f"Invalid DiffusionDPO arguments: pairs_from={pairs_from!r}; use 'data' or 'samples'."
            )
        if pairs_from == "samples" and reward_model is None:
            raise ValueError(
                "Invalid DiffusionDPO arguments: pairs_from='samples' ranks the model's samples "
                "with the reward model; set reward_model to an exported VP-Score directory."
            )
        minimums = {
            "prompts_per_epoch": (prompts_per_epoch, 1),
            "samples_per_prompt": (samples_per_prompt, 2),
            "sample_batch_size": (sample_batch_size, 1),
            "train_batch_size": (train_batch_size, 1),
            "inner_epochs": (inner_epochs, 1),
            "max_pairs_per_prompt": (
                1 if max_pairs_per_prompt is None else max_pairs_per_prompt,
                1,
            ),
        }
        for name, (value, least) in minimums.items():
            if value < least:
                raise ValueError(
                    f"Invalid DiffusionDPO arguments: {name}={value} must be at least {least}."
                )
        super().__init__(
            components,
            reward_model=reward_model,
            reward_weights=reward_weights,
            judge=judge,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            train_text_encoder=False,
            condition_dropout=0.0,
            peft=peft,
            max_prompt_length=max_prompt_length,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.reference_unet = None
        if not has_switchable_adapter(self.unet):
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.rollout_metrics: dict[str, float] = {}

    def train(self, mode: bool = True) -> DiffusionDPO:
        super().train(mode)
        if getattr(self, "reference_unet", None) is not None:
            self.reference_unet.eval()
        return self

    # ------------------------------------------------------------------ the loss

    def denoising_errors(
        self, unet: Any, noisy: Tensor, timesteps: Tensor, text: Tensor, target: Tensor
    ) -> Tensor:
        """Return [B] mean squared errors of ``unet``'s predictions on ``noisy``."""
        prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
        return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))

    def pair_loss(
        self, prompts: list[str], preferred: Tensor, dispreferred: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the Diffusion-DPO loss and diagnostics of P pairs of [P, 3, H, W] images in [0, 1]."""
        x0 = self.images_to_model_space(torch.cat([preferred, dispreferred]))  # [2P, ...]
        count = len(prompts)
        # One noise and one timestep per pair, shared by its two images.
        noise = torch.randn_like(x0[:count]).repeat(2, 1, 1, 1)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (count,), device=x0.device
        ).repeat(2)
        noisy, target = self.noised_sample(x0, noise, timesteps)
        text = self.encode_prompts(list(prompts) * 2)
        policy = self.denoising_errors(self.unet, noisy, timesteps, text, target)
        with torch.no_grad():
            if self.reference_unet is not None:
                reference = self.denoising_errors(
                    self.reference_unet, noisy, timesteps, text, target
                )
            else:
                with adapters_disabled(self.unet):
                    reference = self.denoising_errors(self.unet, noisy, timesteps, text, target)
        loss, diagnostics = diffusion_dpo_loss(
            policy[:count], policy[count:], reference[:count], reference[count:], self.hparams.beta
        )
        diagnostics["errors/chosen"] = policy[:count].detach().mean()
        diagnostics["errors/rejected"] = policy[count:].detach().mean()
        return loss, diagnostics

    def training_step(self, batch: PreferenceBatch | dict[str, Any], batch_index: int) -> Tensor:
        if isinstance(batch, PreferenceBatch):
            prompts, preferred, dispreferred = pairs_from_ratings(
                batch, self.hparams.rating_weights, self.hparams.max_pairs_per_prompt
            )
            if not prompts:
                raise ValueError(
                    "A preference batch gave no pair (no two images of one prompt with "
                    "different ratings); check the data's ratings."
                )
            preferred, dispreferred = batch.images[preferred], batch.images[dispreferred]
        else:
            prompts = list(batch["prompts"])
            preferred, dispreferred = batch["preferred"], batch["dispreferred"]
        loss, diagnostics = self.pair_loss(
            prompts, preferred.to(self.device), dispreferred.to(self.device)
        )
        size = len(prompts)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in diagnostics.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    # ------------------------------------------------------------------ OnPolicyMethod

    def rollout_prompt_count(self) -> int:
        return self.hparams.prompts_per_epoch

    def rollout_batch_count(self) -> int:
        batches = math.ceil(self.hparams.prompts_per_epoch / self.hparams.train_batch_size)
        return self.hparams.inner_epochs * batches

    def rollout_batches(
        self, prompts: list[str], generator: torch.Generator
    ) -> Iterator[dict[str, Any]]:
        """Sample ``samples_per_prompt`` images per prompt, pair the best with the worst, and
        yield ``inner_epochs`` shuffled passes of ``{"prompts", "preferred", "dispreferred"}``.
        """
        if self.hparams.pairs_from != "samples":
            raise ValueError(
                "RolloutDataModule trains on the model's own samples; set "
                "pairs_from='samples', or train pairs_from='data' on preference batches."
            )
        per_prompt = self.hparams.samples_per_prompt
        repeated = [prompt for prompt in prompts for _ in range(per_prompt)]
        size = self.hparams.sample_batch_size
        images, rewards = [], []
        for start in range(0, len(repeated), size):
            chunk = repeated[start : start + size]
            sampled = self.generate(chunk, seed=None, generator=generator)
            with torch.no_grad():
                rewards.append(self.rewards(chunk, sampled)[0])
            images.append(sampled)

        images = torch.cat(images).view(len(prompts), per_prompt, *images[0].shape[1:])
        rewards = torch.cat(rewards).view(len(prompts), per_prompt)
        rows = torch.arange(len(prompts))
        best, worst = rewards.argmax(dim=1), rewards.argmin(dim=1)
        preferred, dispreferred = images[rows, best], images[rows, worst]
        self.rollout_metrics = {
            "reward": rewards.mean().item(),
            "reward/chosen": rewards[rows, best].mean().item(),
            "reward/rejected": rewards[rows, worst].mean().item(),
        }

        for _ in range(self.hparams.inner_epochs):
            order = torch.randperm(len(prompts), generator=generator)
            for start in range(0, len(prompts), self.hparams.train_batch_size):
                chosen = order[start : start + self.hparams.train_batch_size]
                yield {
                    "prompts": [prompts[row] for row in chosen.tolist()],
                    "preferred": preferred[chosen],
                    "dispreferred": dispreferred[chosen],
                }

    def on_train_epoch_end(self) -> None:
        # Statistics of the samples drawn at the start of this epoch (pairs_from="samples").
        for name, value in self.rollout_metrics.items():
            self.log(f"train/samples/{name}", value)
