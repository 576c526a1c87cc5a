"""Text-to-image diffusion on diffusers components, and plain denoising fine-tuning.

:class:`DiffusionComponents` names what every text-to-image method here needs: a
``UNet2DConditionModel``, a noise scheduler, a transformers text encoder with its
tokenizer, and an optional VAE. Without a VAE the model works in pixel space. Each part
comes from a pretrained pipeline directory or hub name (the usual ``unet/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/`` and ``vae/`` subfolders) or from inline
configs with random weights.

:class:`TextToImageDiffusion` trains with the denoising loss (Ho et al., 2020): for an
image x0 (pixels scaled to [-1, 1], or VAE latents times the VAE's scaling factor), a
uniformly drawn timestep t and Gaussian noise e, the UNet receives
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e and regresses the target that the scheduler's
``prediction_type`` names: e (``epsilon``) or v = sqrt(abar_t) e - sqrt(1 - abar_t) x0
(``v_prediction``). Prompts are replaced by the empty prompt with probability
``condition_dropout``, which is what classifier-free guidance needs at sampling time.
This loss is also the pre-training regularizer of ReFL.

Sampling (:meth:`TextToImageDiffusion.generate`) runs DDIM with classifier-free guidance
and returns images in [0, 1]; with a fixed seed it is deterministic.

Notation: B images, C channels, H x W pixels (or latent positions), L text tokens,
D text hidden size.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.annotation import Annotator
from lightning_modules.adapters import (
    AdapterHooks,
    BitFit,
    adapter_config,
    apply_adapter,
    describe_adapter,
    merge_adapter,
    save_adapter,
)
from lightning_modules.backbones import Backbone, load_model, load_tokenizer, resolve_location

log = logging.getLogger(__name__)


@dataclass
class DiffusionComponents:
    """Sources of the parts of a text-to-image diffusion model.

    Args:
        pretrained: pipeline directory or hub name with ``unet/``, ``text_encoder/``,
            ``tokenizer/``, ``scheduler/`` and, for latent models, ``vae/`` subfolders.
            Exclusive with the other fields.
        unet: ``UNet2DConditionModel`` config for random initialization.
        text_encoder: the text encoder as a :class:`Backbone` (``pretrained`` or
            ``config`` plus ``tokenizer``), loaded with ``AutoModel``.
        scheduler: ``DDPMScheduler`` config (``num_train_timesteps``, ``beta_schedule``,
            ``prediction_type``, ...); None takes the diffusers defaults.
        vae: ``AutoencoderKL`` config for a latent model; None works in pixel space.
    """

    pretrained: str | None = None
    unet: dict[str, Any] | None = None
    text_encoder: Backbone | None = None
    scheduler: dict[str, Any] | None = None
    vae: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.text_encoder, dict):
            self.text_encoder = Backbone.coerce(self.text_encoder)
        configured = [
            name for name in ("unet", "text_encoder", "scheduler", "vae") if getattr(self, name)
        ]
        if self.pretrained is not None and configured:
            raise ValueError(
                f"DiffusionComponents takes either pretrained ({self.pretrained!r}) or "
                f"inline configs, not both; remove {configured} or pretrained."
            )
        if self.pretrained is None and (self.unet is None or self.text_encoder is None):
            raise ValueError(
                "DiffusionComponents needs pretrained (a pipeline directory or hub name), or "
                "both unet (a UNet2DConditionModel config) and text_encoder (a Backbone)."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping for checkpoint hyper-parameters."""
        return {
            "pretrained": self.pretrained,
            "unet": self.unet,
            "text_encoder": None if self.text_encoder is None else self.text_encoder.to_dict(),
            "scheduler": self.scheduler,
            "vae": self.vae,
        }

    def load(self) -> tuple[nn.Module, Any, nn.Module, Any, nn.Module | None]:
        """Return (unet, scheduler, text encoder, tokenizer, vae or None)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        if self.pretrained is not None:
            from transformers import AutoModel, AutoTokenizer

            location = resolve_location(self.pretrained)
            unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet")
            scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler")
            text_encoder = AutoModel.from_pretrained(location, subfolder="text_encoder")
            tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
            try:
                vae = AutoencoderKL.from_pretrained(location, subfolder="vae")
            except OSError:
                log.info("No vae/ in %s: the model works in pixel space.", self.pretrained)
                vae = None
            return unet, scheduler, text_encoder, tokenizer, vae

        unet = UNet2DConditionModel.from_config(self.unet)
        scheduler = DDPMScheduler.from_config(self.scheduler or {})
        text_encoder = load_model(self.text_encoder)
        tokenizer = load_tokenizer(self.text_encoder)
        vae = AutoencoderKL.from_config(self.vae) if self.vae is not None else None
        return unet, scheduler, text_encoder, tokenizer, vae


def predicted_original(
    model_output: Tensor,
    sample: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str,
) -> Tensor:
    """Return the x0 that a UNet output implies at x_t = ``sample`` and ``timesteps``.

    epsilon: x0 = (x_t - sqrt(1 - abar_t) e) / sqrt(abar_t);
    v_prediction: x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v;
    sample: the output is x0 itself.
    """
    abar = alphas_cumprod.to(sample.device, sample.dtype)[timesteps].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return (sample - (1 - abar).sqrt() * model_output) / abar.sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt() * sample - (1 - abar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


class TextToImageDiffusion(AdapterHooks):
    """Denoising fine-tuning of a text-conditional diffusion model (see the module docstring).

    Batches are ``(images, prompts)``: images [B, 3, H, W] with values in [0, 1] and one
    prompt per image.

    Args:
        components: UNet, scheduler, text encoder (+ tokenizer) and optional VAE.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        train_text_encoder: also train the text encoder (a randomly initialized one
            must train; a pretrained one usually stays frozen).
        condition_dropout: probability of training a sample on the empty prompt.
        peft: a peft config (e.g. LoRA on ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) or
            ``BitFit`` for the UNet; None trains the whole UNet.
        max_prompt_length: maximum text tokens per prompt.
        num_inference_steps: DDIM steps of :meth:`generate` and of validation samples.
        guidance_scale: classifier-free guidance weight w of :meth:`generate`:
            e = e(empty) + w (e(prompt) - e(empty)); 1 disables guidance.
        gradient_checkpointing: recompute UNet activations in the backward pass.
    """

    def __init__(
        self,
        components: DiffusionComponents,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        train_text_encoder: bool = False,
        condition_dropout: float = 0.1,
        peft: peft.PeftConfig | BitFit | None = None,
        max_prompt_length: int = 77,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if isinstance(components, dict):
            components = DiffusionComponents(**components)
        if not 0 <= condition_dropout < 1:
            raise ValueError(f"condition_dropout={condition_dropout} must be in [0, 1).")
        self.save_hyperparameters(ignore=["components", "peft"])
        self.hparams["components"] = components.to_dict()
        self.hparams["peft"] = describe_adapter(peft)

        unet, self.noise_scheduler, text_encoder, self.tokenizer, vae = components.load()
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = apply_adapter(unet, peft)
        self.text_encoder = text_encoder
        self.text_encoder.requires_grad_(train_text_encoder)
        self.text_encoder.train(train_text_encoder)
        self.vae = vae
        if self.vae is not None:
            self.vae.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> TextToImageDiffusion:
        """Set train or eval mode; a frozen text encoder and the VAE always stay in eval mode.

        ``generate`` and the rollouts of on-policy methods switch the whole module to eval
        and back, so without this a frozen text encoder would come back in train mode and
        apply dropout to the prompt embeddings.
        """
        super().train(mode)
        hparams = getattr(self, "_hparams", None)
        if hparams is not None and not hparams.get("train_text_encoder", False):
            self.text_encoder.eval()
        if getattr(self, "vae", None) is not None:
            self.vae.eval()
        return self

    # ------------------------------------------------------------------ building blocks

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Return [B, L, D] text encoder hidden states."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.hparams.max_prompt_length,
            return_tensors="pt",
        ).to(self.device)
        output = self.text_encoder(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return output.last_hidden_state

    def images_to_model_space(self, images: Tensor) -> Tensor:
        """Map [0, 1] pixels to what the UNet denoises: [-1, 1] pixels or scaled latents."""
        pixels = images * 2 - 1
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def model_space_to_images(self, samples: Tensor) -> Tensor:
        """Map UNet samples back to [0, 1] pixels (decoding latents with the VAE)."""
        if self.vae is not None:
            samples = self.vae.decode(samples / self.vae.config.scaling_factor).sample
        return ((samples + 1) / 2).clamp(0, 1)

    def denoising_loss(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Return the mean squared error of the UNet's prediction on noised ``images``."""
        x0 = self.images_to_model_space(images)
        prompts = list(prompts)
        if self.training and self.hparams.condition_dropout > 0:
            dropped = torch.rand(len(prompts)) < self.hparams.condition_dropout
            prompts = [
                "" if drop else prompt for drop, prompt in zip(dropped, prompts, strict=True)
            ]
        text = self.encode_prompts(prompts)
        noise = torch.randn_like(x0)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (len(x0),), device=x0.device
        )
        noisy, target = self.noised_sample(x0, noise, timesteps)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=text).sample
        return F.mse_loss(prediction.float(), target.float())

    def noised_sample(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """Return (x_t, the UNet's regression target) for clean ``x0``, ``noise`` and ``timesteps`` [B]."""
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        if self.prediction_type == "epsilon":
            return noisy, noise
        if self.prediction_type == "v_prediction":
            return noisy, self.noise_scheduler.get_velocity(x0, noise, timesteps)
        raise ValueError(
            f"prediction_type {self.prediction_type!r} is not supported for training; "
            "set the scheduler's prediction_type to epsilon or v_prediction."
        )

    # ------------------------------------------------------------------ sampling

    def sampling_scheduler(self, num_inference_steps: int | None = None) -> Any:
        """Return a DDIM scheduler with this model's noise schedule, set to ``num_inference_steps``."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        scheduler.set_timesteps(
            num_inference_steps or self.hparams.num_inference_steps, device=self.device
        )
        return scheduler

    def guided_prediction(
        self, samples: Tensor, timestep: Tensor, text: Tensor, empty: Tensor, guidance_scale: float
    ) -> Tensor:
        """Return the UNet output with classifier-free guidance.

        ``timestep`` is one timestep for the whole batch (a scalar) or one per sample ([B]).
        """
        if guidance_scale == 1:
            return self.unet(samples, timestep, encoder_hidden_states=text).sample
        if timestep.ndim > 0:
            timestep = torch.cat([timestep, timestep])
        both = self.unet(
            torch.cat([samples, samples]), timestep, encoder_hidden_states=torch.cat([empty, text])
        ).sample
        unconditional, conditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    def initial_noise(
        self, count: int, seed: int | None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Return [count, C, H, W] Gaussian noise, reproducible for a given ``seed``.

        With a CPU ``generator`` instead of a seed, the noise is drawn from it.
        """
        config = self.unet.config
        shape = (count, config.in_channels, config.sample_size, config.sample_size)
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator).to(self.device, self.dtype)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seed: int | None = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample one image per prompt with DDIM (eta = 0); returns [B, 3, H, W] in [0, 1].

        The initial noise comes from ``seed``, or from the CPU ``generator`` when ``seed``
        is None.
        """
        was_training = self.training
        self.eval()
        guidance_scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        scheduler = self.sampling_scheduler(num_inference_steps)
        text = self.encode_prompts(prompts)
        empty = self.encode_prompts([""] * len(prompts))
        samples = self.initial_noise(len(prompts), seed, generator) * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(samples, timestep)
            output = self.guided_prediction(model_input, timestep, text, empty, guidance_scale)
            samples = scheduler.step(output, timestep, samples).prev_sample
        images = self.model_space_to_images(samples)
        self.train(was_training)
        return images

    # ------------------------------------------------------------------ Lightning

    def training_step(self, batch: tuple[Tensor, list[str]], batch_index: int) -> Tensor:
        images, prompts = batch
        loss = self.denoising_loss(images, prompts)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: tuple[Tensor, list[str]], batch_index: int) -> None:
        images, prompts = batch
        # Fixed timesteps and noise per batch index, so validation losses compare across epochs.
        state = torch.random.get_rng_state()
        torch.manual_seed(batch_index)
        loss = self.denoising_loss(images, prompts)
        torch.random.set_rng_state(state)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(images), sync_dist=True)

    # ------------------------------------------------------------------ export

    def export_artifact(self, directory: Path) -> None:
        """Write a diffusers-style directory: ``unet/`` (or ``unet_adapter/``), ``text_encoder/``,
        ``tokenizer/``, ``scheduler/``, ``vae/`` when there is one, and ``text_to_image.json``.
        ``from_export`` loads it back.
        """
        directory = Path(directory)
        unet = self.unet
        if adapter_config(unet) is not None:
            save_adapter(unet, directory / "unet_adapter")
            unet = merge_adapter(copy.deepcopy(unet))
        unet.save_pretrained(directory / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(directory / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(directory / "tokenizer")
        self.noise_scheduler.save_pretrained(directory / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae", safe_serialization=True)
        settings = {
            key: self.hparams[key]
            for key in ("max_prompt_length", "num_inference_steps", "guidance_scale")
        }
        (directory / "text_to_image.json").write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_export(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> TextToImageDiffusion:
        """Load an exported model in eval mode; ``model.generate(prompts)`` samples from it."""
        directory = Path(directory)
        settings_path = directory / "text_to_image.json"
        if not settings_path.is_file():
            raise FileNotFoundError(
                f"{settings_path} not found: {directory} is not a text-to-image export directory."
            )
        settings = json.loads(settings_path.read_text())
        model = cls(DiffusionComponents(pretrained=str(directory)), **settings)
        return model.to(map_location).eval()


class RewardedDiffusion(TextToImageDiffusion):
    """Base of the methods that fine-tune a text-to-image model against a frozen reward model.

    It contains the reward model (a VP-Score export, or any scorer with the same
    ``score(prompts, images) -> [B, A]`` and ``combine`` API), the weights that turn its
    aspects into one reward, and an optional judge: an annotator independent of the
    reward. Validation samples the validation prompts with :meth:`generate` (DDIM,
    eta = 0, one fixed seed per batch) and logs ``val/reward``, ``val/reward/<aspect>``
    and, with a judge, ``val/judge/<aspect>``. A reward that rises while the judge stays
    flat or falls is reward hacking.

    Args:
        components: the diffusion model to fine-tune.
        reward_model: directory of an exported VP-Score (``load_scorer``); it stays
            frozen. None is allowed where the method does not need a reward (validation
            then logs the judge only).
        reward_weights: weights of the reward model's aspects in the reward r; None uses
            the reward model's overall score.
        judge: an annotator independent of the reward model, scored at validation.
        **kwargs: the arguments of :class:`TextToImageDiffusion`.
    """

    def __init__(
        self,
        components: DiffusionComponents,
        reward_model: str | None = None,
        reward_weights: list[float] | None = None,
        judge: Annotator | None = None,
        **kwargs: Any,
    ):
        super().__init__(components, **kwargs)
        from lightning_modules.reward_model import load_scorer

        # Recorded here as well, whatever the parent's save_hyperparameters collects.
        self.hparams.update({"reward_model": reward_model, "reward_weights": reward_weights})
        self.judge = judge
        self.scorer = None
        if reward_model is not None:
            self.scorer = load_scorer(Path(reward_model))
            self.scorer.requires_grad_(False)
        if reward_weights is not None:
            if self.scorer is None:
                raise ValueError(
                    f"reward_weights={reward_weights} is set but reward_model is None; "
                    "set reward_model to an exported VP-Score directory or drop reward_weights."
                )
            if len(reward_weights) != len(self.scorer.aspects):
                raise ValueError(
                    f"reward_weights={reward_weights} has {len(reward_weights)} entries for "
                    f"the reward model's aspects {self.scorer.aspects}; give one weight per aspect."
                )

    def train(self, mode: bool = True) -> RewardedDiffusion:
        super().train(mode)
        if self.scorer is not None:
            self.scorer.eval()  # the reward model never trains, so its dropout stays off
        return self

    def rewards(self, prompts: list[str], images: Tensor) -> tuple[Tensor, Tensor]:
        """Return (r [B], aspect scores [B, A]) of ``images`` in [0, 1] for ``prompts``."""
        if self.scorer is None:
            raise RuntimeError(
                f"{type(self).__name__} has no reward model; set reward_model to an exported "
                "VP-Score directory."
            )
        scores = self.scorer.score(prompts, images)
        if self.hparams.reward_weights is None:
            return self.scorer.combine(scores), scores
        weights = scores.new_tensor(self.hparams.reward_weights)
        return scores @ weights, scores

    def validation_step(self, prompts: list[str], batch_index: int) -> None:
        prompts = list(prompts)
        size = len(prompts)
        # Fixed noise per batch, so the rewards of successive epochs compare.
        images = self.generate(prompts, seed=batch_index)
        if self.scorer is not None:
            with torch.no_grad():
                rewards, scores = self.rewards(prompts, images)
            self.log("val/reward", rewards.mean(), prog_bar=True, batch_size=size, sync_dist=True)
            for column, aspect in enumerate(self.scorer.aspects):
                self.log(
                    f"val/reward/{aspect}",
                    scores[:, column].mean(),
                    batch_size=size,
                    sync_dist=True,
                )
        if self.judge is not None:
            judged = self.judge.annotate(prompts, images.detach().float().cpu())
            for aspect, values in judged.items():
                self.log(
                    f"val/judge/{aspect}",
                    torch.nanmean(values.float()),
                    batch_size=size,
                    sync_dist=True,
                )
