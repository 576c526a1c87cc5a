"""DDPO: reinforcement learning on the denoising chain (Black et al., 2023), clipped variant.

With eta > 0, every DDIM step (Song et al., 2021, eq. 12) is a Gaussian policy
transition p(x_prev | x_t, c) = N(mu, sigma_t^2 I) with

    mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) e_hat,
    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)),

where x0_hat and e_hat come from the (guided) UNet output at x_t. The image x_0 at the end
of the chain earns the reward r(x_0, c) of a frozen scorer. One DDPO epoch:

1. Sample ``samples_per_epoch`` images with this stochastic sampler, without gradients,
   recording every latent and the log-probability of every transition.
2. Score them. The advantage of a sample is its reward standardized by the mean and
   standard deviation of the last ``stat_buffer_size`` rewards of the same prompt, or
   by the whole batch's statistics while the prompt has fewer than ``stat_min_count``.
   Advantages are clipped to [-``advantage_clip``, ``advantage_clip``].
3. For ``inner_epochs`` passes over the samples, in shuffled minibatches of
   ``train_batch_size`` trajectories, train on ``steps_per_trajectory`` randomly chosen
   steps of each trajectory with PPO's clipped objective
   max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(log p_theta - log p_old).

DDPO accumulates the gradients of a minibatch's trained steps and then takes one
optimizer step. The batches arrive in that order: the trajectories of a minibatch at
their first chosen step, then at their second, and so on. So with
``trainer.accumulate_grad_batches`` equal to ``steps_per_trajectory``, Lightning steps
exactly as DDPO does. Sampling and training alternate through
:class:`datamodules.rollouts.RolloutDataModule`; each Lightning epoch is one DDPO epoch.

Log-probabilities are per dimension (the mean over C x H x W of the Gaussian log-density
of each element), as DDPO's published code computes them; the default clip range 1e-4
is tuned for that scale. A transition whose variance is zero (the last one, when the
schedule ends at timestep 0) is deterministic and never trained.
NOTE: under DDP the reward statistics are kept per process; DDPO's published code
gathers the rewards of all processes first, and this class does not.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator
from typing import Any

import peft
import torch
from torch import Tensor

from datamodules.annotation import Annotator
from lightning_modules.adapters import BitFit
from lightning_modules.text_to_image import DiffusionComponents, RewardedDiffusion


def ddim_transition(
    scheduler: Any,
    model_output: Tensor,
    timesteps: Tensor,
    sample: Tensor,
    eta: float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Take one stochastic DDIM step and compute the log-probability of its result.

    Follows ``diffusers.DDIMScheduler.step`` (x0 clipping as configured, no
    thresholding), with one timestep per sample.

    Args:
        scheduler: a ``DDIMScheduler`` after ``set_timesteps``.
        model_output: [B, C, H, W] UNet output at ``sample``.
        timesteps: [B] timestep of each sample.
        sample: [B, C, H, W] x_t.
        eta: DDIM's eta (> 0).
        noise: [B, C, H, W] standard normal noise for the step; exclusive with ``prev_sample``.
        prev_sample: [B, C, H, W] x_prev to evaluate instead of sampling one.

    Returns:
        (x_prev [B, C, H, W], log p(x_prev | x_t) [B], the mean over dimensions of the
        element-wise Gaussian log-density). A transition with sigma_t = 0 (see
        :func:`transition_std`) is deterministic: x_prev is its mean and its log p is 0.
    """
    config = scheduler.config
    if config.thresholding:
        raise ValueError(
            "ddim_transition does not implement dynamic thresholding; set the scheduler's "
            "thresholding to false."
        )
    if (noise is None) == (prev_sample is None):
        raise ValueError("ddim_transition takes exactly one of noise and prev_sample.")
    if eta <= 0:
        raise ValueError(f"eta={eta}: the transition is deterministic; DDPO needs eta > 0.")
    abar, abar_prev = _cumulative_alphas(scheduler, timesteps.to(sample.device))
    std64 = eta * _variance(abar, abar_prev).sqrt()

    def column(values: Tensor) -> Tensor:
        return values.to(sample.dtype).view(-1, *([1] * (sample.ndim - 1)))

    a, a_prev, std = column(abar), column(abar_prev), column(std64)
    if config.prediction_type == "epsilon":
        x0 = (sample - (1 - a).sqrt() * model_output) / a.sqrt()
        epsilon = model_output
    elif config.prediction_type == "v_prediction":
        x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output
        epsilon = a.sqrt() * model_output + (1 - a).sqrt() * sample
    elif config.prediction_type == "sample":
        x0 = model_output
        epsilon = (sample - a.sqrt() * x0) / (1 - a).sqrt()
    else:
        raise ValueError(f"unknown prediction_type {config.prediction_type!r}")
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * epsilon
    if prev_sample is None:
        prev_sample = mean + std * noise
    stochastic = (std64 > 0).view(-1, *([1] * (sample.ndim - 1)))
    # Deterministic rows get log-probability 0 (a placeholder: they carry no policy
    # gradient); the divisions below use 1 there to stay finite.
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_density = (
        -((prev_sample.detach() - mean) ** 2) / (2 * safe_std**2)
        - safe_std.log()
        - 0.5 * math.log(2 * math.pi)
    )
    log_probs = log_density.mean(dim=tuple(range(1, sample.ndim)))
    return prev_sample, torch.where(std64 > 0, log_probs, torch.zeros_like(log_probs))


def transition_std(scheduler: Any, timesteps: Tensor, eta: float) -> Tensor:
    """Return sigma_t [B] (float64) of the DDIM transitions from ``timesteps`` [B].

    It is zero where the previous cumulative alpha equals the current one or is 1: the
    last step of a schedule that ends at timestep 0, for example, is deterministic.
    """
    return eta * _variance(*_cumulative_alphas(scheduler, timesteps)).sqrt()


def _cumulative_alphas(scheduler: Any, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """Return (abar_t, abar_prev), float64 [B], as ``DDIMScheduler.step`` looks them up."""
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(timesteps.device, torch.float64)
    previous = timesteps - step
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    abar_prev = torch.where(previous >= 0, alphas[previous.clamp(min=0)], final.to(alphas.device))
    return alphas[timesteps], abar_prev


def _variance(abar: Tensor, abar_prev: Tensor) -> Tensor:
    return ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0)


def clipped_policy_loss(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate loss, mean over transitions (all arguments [N]).

    Returns the loss and diagnostics: the mean ratio, the fraction of ratios outside
    [1 - clip_range, 1 + clip_range], and the approximate KL 0.5 * mean((log p - log p_old)^2).
    """
    ratio = (log_probs - old_log_probs).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        diagnostics = {
            "ratio": ratio.mean(),
            "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * ((log_probs - old_log_probs) ** 2).mean(),
        }
    return loss, diagnostics


class PromptRewardStatistics:
    """Running reward statistics per prompt, for DDPO's advantage standardization.

    Each prompt keeps its last ``buffer_size`` rewards. A reward is standardized by its
    prompt's buffer once the buffer contains ``min_count`` rewards, and by the statistics
    of all rewards passed in the same call before that (population standard deviation).
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(
                f"buffer_size={buffer_size} must be at least 1 and min_count={min_count} "
                "between 1 and buffer_size."
            )
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Return [N] standardized rewards, after adding ``rewards`` [N] to the buffers."""
        values = rewards.detach().double().cpu()
        batch_mean, batch_std = values.mean(), values.std(unbiased=False)
        result = torch.empty_like(values)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = history.mean(), history.std(unbiased=False)
            result[rows] = (values[rows] - mean) / (std + 1e-6)
        return result.to(rewards.device, rewards.dtype)

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.buffers = {
            prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state.items()
        }


class DDPO(RewardedDiffusion):
    """DDPO with the clipped objective (see the module docstring); train it with
    :class:`datamodules.rollouts.RolloutDataModule`.

    Args:
        components: the diffusion model to fine-tune, usually ``pretrained``.
        reward_model: directory of an exported VP-Score; it stays frozen.
        reward_weights: weights of the reward model's aspects; None uses its overall score.
        samples_per_epoch: images sampled per epoch (one prompt drawn for each).
        sample_batch_size: images sampled per UNet batch.
        train_batch_size: trajectories per training minibatch.
        inner_epochs: passes over each epoch's samples.
        steps_per_trajectory: denoising steps trained per trajectory and pass; None
            trains all stochastic steps (see :meth:`stochastic_steps`).
        eta: DDIM's eta of the rollouts (1 gives DDPM-like variance).
        clip_range: PPO's epsilon.
        advantage_clip: advantages are clipped to [-advantage_clip, advantage_clip].
        per_prompt_statistics: standardize rewards per prompt (True) or over each epoch's
            samples (False).
        stat_buffer_size: rewards remembered per prompt.
        stat_min_count: rewards a prompt needs before its own statistics are used.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        peft: adapter for the UNet (LoRA on its attention projections is typical).
        max_prompt_length: maximum text tokens per prompt.
        num_inference_steps: DDIM steps of the rollouts and of ``generate``.
        guidance_scale: classifier-free guidance weight of rollouts and training.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        judge: an annotator independent of the reward, scored at validation.
    """

    def __init__(
        self,
        components: DiffusionComponents,
        reward_model: str,
        reward_weights: list[float] | None = None,
        samples_per_epoch: int = 256,
        sample_batch_size: int = 16,
        train_batch_size: int = 8,
        inner_epochs: int = 1,
        steps_per_trajectory: int | None = None,
        eta: float = 1.0,
        clip_range: float = 1e-4,
        advantage_clip: float = 5.0,
        per_prompt_statistics: bool = True,
        stat_buffer_size: int = 32,
        stat_min_count: int = 16,
        learning_rate: float = 3e-4,
        weight_decay: float = 1e-4,
        peft: peft.PeftConfig | BitFit | None = None,
        max_prompt_length: int = 77,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        gradient_checkpointing: bool = False,
        judge: Annotator | None = None,
    ):
        counts = {
            "samples_per_epoch": samples_per_epoch,
            "sample_batch_size": sample_batch_size,
            "train_batch_size": train_batch_size,
            "inner_epochs": inner_epochs,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"Invalid DDPO arguments: {name}={value} must be at least 1.")
        if steps_per_trajectory is not None and not (
            1 <= steps_per_trajectory <= num_inference_steps
        ):
            raise ValueError(
                f"Invalid DDPO arguments: steps_per_trajectory={steps_per_trajectory} must be "
                f"between 1 and num_inference_steps={num_inference_steps}, or null for all."
            )
        if not 0 < eta <= 1 or clip_range <= 0 or advantage_clip <= 0:
            raise ValueError(
                f"Invalid DDPO arguments: eta={eta} must be in (0, 1] (above 1 the DDIM "
                f"variance exceeds 1 - abar_prev), and clip_range={clip_range} and "
                f"advantage_clip={advantage_clip} must be positive."
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
        self.reward_statistics = PromptRewardStatistics(stat_buffer_size, stat_min_count)
        self.rollout_metrics: dict[str, float] = {}

    def stochastic_steps(self) -> Tensor:
        """Return the indices of the sampling steps whose transition has nonzero variance."""
        scheduler = self.sampling_scheduler()
        std = transition_std(scheduler, scheduler.timesteps, self.hparams.eta)
        return (std > 0).nonzero().flatten().cpu()

    @property
    def trained_steps(self) -> int:
        """Steps trained per trajectory and pass: ``steps_per_trajectory``, or all stochastic ones."""
        available = len(self.stochastic_steps())
        requested = self.hparams.steps_per_trajectory or available
        if requested > available:
            raise ValueError(
                f"steps_per_trajectory={requested}, but only {available} of the "
                f"{self.hparams.num_inference_steps} sampling steps are stochastic (the last "
                f"step of a schedule ending at timestep 0 is not); set it to at most {available}."
            )
        return requested

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample_trajectories(
        self, prompts: list[str], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Sample one image per prompt and record its trajectory.

        Returns ``latents`` [B, S + 1, C, H, W] (x_T first), ``log_probs`` [B, S],
        ``timesteps`` [S], ``rewards`` [B] and ``scores`` [B, A], with S =
        ``num_inference_steps``.
        """
        was_training = self.training
        self.eval()
        with self.precision_context():
            trajectory = self._sample_trajectories(prompts, generator)
        self.train(was_training)
        return trajectory

    def precision_context(self) -> Any:
        """Return the trainer's autocast context, so rollouts run at the training precision.

        The log-probabilities of sampling and of training must agree to well within the
        clip range, so both use the same precision. Outside a trainer: no autocast.
        """
        if self._trainer is None:
            return contextlib.nullcontext()
        return self.trainer.precision_plugin.forward_context()

    def _sample_trajectories(
        self, prompts: list[str], generator: torch.Generator
    ) -> dict[str, Tensor]:
        scheduler = self.sampling_scheduler()
        text = self.encode_prompts(prompts)
        empty = self.encode_prompts([""] * len(prompts))
        latents = self.initial_noise(len(prompts), None, generator) * scheduler.init_noise_sigma
        trajectory, log_probs = [latents], []
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, timestep)
            output = self.guided_prediction(
                model_input, timestep, text, empty, self.hparams.guidance_scale
            )
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            latents, log_prob = ddim_transition(
                scheduler,
                output,
                timestep.expand(len(prompts)),
                latents,
                self.hparams.eta,
                noise=noise,
            )
            trajectory.append(latents)
            log_probs.append(log_prob)
        rewards, scores = self.rewards(prompts, self.model_space_to_images(latents))
        return {
            "latents": torch.stack(trajectory, dim=1),
            "log_probs": torch.stack(log_probs, dim=1),
            "timesteps": scheduler.timesteps.clone(),
            "rewards": rewards,
            "scores": scores,
        }

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Return the clipped, standardized advantages [N] of ``rewards`` [N]."""
        if self.hparams.per_prompt_statistics:
            standardized = self.reward_statistics.advantages(prompts, rewards)
        else:
            standardized = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
        clip = self.hparams.advantage_clip
        return standardized.clamp(-clip, clip)

    # ------------------------------------------------------------------ OnPolicyMethod

    def rollout_prompt_count(self) -> int:
        return self.hparams.samples_per_epoch

    def rollout_batch_count(self) -> int:
        minibatches = math.ceil(self.hparams.samples_per_epoch / self.hparams.train_batch_size)
        return self.hparams.inner_epochs * minibatches * self.trained_steps

    def rollout_batches(
        self, prompts: list[str], generator: torch.Generator
    ) -> Iterator[dict[str, Any]]:
        """Sample for ``prompts``, then yield the transitions to train on, in DDPO's order.

        Each batch contains ``train_batch_size`` trajectories at one of their chosen steps:
        ``prompts``, ``latents`` and ``next_latents`` [b, C, H, W], ``timesteps`` [b],
        ``log_probs`` [b] (at sampling time) and ``advantages`` [b].
        """
        size = self.hparams.sample_batch_size
        parts = [
            self.sample_trajectories(prompts[start : start + size], generator)
            for start in range(0, len(prompts), size)
        ]
        rollouts = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        timesteps = parts[0]["timesteps"]
        advantages = self.advantages(prompts, rollouts["rewards"])
        self.rollout_metrics = {
            "reward": rollouts["rewards"].mean().item(),
            "reward_std": rollouts["rewards"].std(unbiased=False).item(),
            **{
                f"reward/{aspect}": rollouts["scores"][:, column].mean().item()
                for column, aspect in enumerate(self.scorer.aspects)
            },
        }
        count = len(prompts)
        stochastic, trained = self.stochastic_steps(), self.trained_steps
        for _ in range(self.hparams.inner_epochs):
            order = torch.randperm(count, generator=generator)
            # [N, k] step indices per trajectory, a random subset of the stochastic steps.
            chosen = torch.stack(
                [stochastic[torch.randperm(len(stochastic), generator=generator)] for _ in order]
            )[:, :trained]
            for start in range(0, count, self.hparams.train_batch_size):
                rows = order[start : start + self.hparams.train_batch_size]
                for position in range(trained):
                    steps = chosen[rows, position]
                    yield {
                        "prompts": [prompts[row] for row in rows.tolist()],
                        "latents": rollouts["latents"][rows, steps],
                        "next_latents": rollouts["latents"][rows, steps + 1],
                        "timesteps": timesteps[steps],
                        "log_probs": rollouts["log_probs"][rows, steps],
                        "advantages": advantages[rows],
                    }

    # ------------------------------------------------------------------ Lightning

    def on_fit_start(self) -> None:
        super().on_fit_start()
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate % self.trained_steps:
            self.print(
                f"DDPO: trainer.accumulate_grad_batches={accumulate} is not a multiple of "
                f"the {self.trained_steps} trained steps per trajectory, so optimizer steps "
                "do not align with minibatches of trajectories as in DDPO."
            )

    def log_probabilities(self, batch: dict[str, Any]) -> Tensor:
        """Return [b] log p_theta(next_latents | latents) under the current weights."""
        prompts = list(batch["prompts"])
        text = self.encode_prompts(prompts)
        empty = self.encode_prompts([""] * len(prompts))
        scheduler = self.sampling_scheduler()
        timesteps = batch["timesteps"].to(self.device)
        latents = batch["latents"].to(self.device)
        output = self.guided_prediction(
            latents, timesteps, text, empty, self.hparams.guidance_scale
        )
        _, log_probs = ddim_transition(
            scheduler,
            output,
            timesteps,
            latents,
            self.hparams.eta,
            prev_sample=batch["next_latents"].to(self.device),
        )
        return log_probs

    def training_step(self, batch: dict[str, Any], batch_index: int) -> Tensor:
        log_probs = self.log_probabilities(batch)
        loss, diagnostics = clipped_policy_loss(
            log_probs,
            batch["log_probs"].to(log_probs),
            batch["advantages"].to(log_probs),
            self.hparams.clip_range,
        )
        size = len(batch["prompts"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in diagnostics.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    def on_train_epoch_end(self) -> None:
        # Statistics of this epoch's samples, which were drawn before its training steps.
        for name, value in self.rollout_metrics.items():
            self.log(f"train/samples/{name}", value, prog_bar=name == "reward")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ddpo_reward_statistics"] = self.reward_statistics.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reward_statistics.load_state_dict(checkpoint.get("ddpo_reward_statistics", {}))
