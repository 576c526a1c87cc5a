"""DDPO: the DDIM transition density, the clipped objective, reward statistics, rollouts, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from datamodules.rollouts import RolloutDataModule, RolloutDataset
from datamodules.text_image import DigitsPromptDataModule
from lightning_modules.backbones import Backbone
from lightning_modules.ddpo import (
    DDPO,
    PromptRewardStatistics,
    clipped_policy_loss,
    ddim_transition,
)
from lightning_modules.text_to_image import DiffusionComponents
from tests.conftest import fit_quietly
from tests.test_text_to_image import TINY_TEXT, TINY_UNET

PROMPTS = ["a handwritten digit one", "the digit 7", "a handwritten digit one"]


def scheduler(prediction_type: str = "epsilon", steps: int = 5) -> DDIMScheduler:
    result = DDIMScheduler(
        num_train_timesteps=100,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        set_alpha_to_one=False,
    )
    result.set_timesteps(steps)
    return result


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_transition_matches_diffusers_ddim_step(prediction_type: str) -> None:
    ddim = scheduler(prediction_type)
    generator = torch.Generator().manual_seed(0)
    sample, output, noise = (torch.randn(2, 3, 4, 4, generator=generator) for _ in range(3))
    for timestep in ddim.timesteps:
        expected = ddim.step(output, timestep, sample, eta=0.7, variance_noise=noise).prev_sample
        actual, _ = ddim_transition(ddim, output, timestep.expand(2), sample, 0.7, noise=noise)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_log_probability_is_the_gaussian_density_by_hand() -> None:
    ddim = scheduler("epsilon", steps=4)  # timesteps 75, 50, 25, 0; 25 apart
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 1, 2, 2, generator=generator)
    output = torch.randn(2, 1, 2, 2, generator=generator) * 0.1
    target = torch.randn(2, 1, 2, 2, generator=generator)
    eta = 0.5
    # Per sample: timestep 50 (previous 25) for the first, 75 (previous 50) for the second.
    timesteps = torch.tensor([50, 75])
    _, log_probs = ddim_transition(ddim, output, timesteps, sample, eta, prev_sample=target)
    abar = ddim.alphas_cumprod.double()
    for row, (t, prev_abar) in enumerate([(50, abar[25]), (75, abar[50])]):
        a = abar[t]
        x0 = ((sample[row].double() - (1 - a).sqrt() * output[row]) / a.sqrt()).clamp(-1, 1)
        sigma = eta * math.sqrt((1 - prev_abar) / (1 - a) * (1 - a / prev_abar))
        mean = prev_abar.sqrt() * x0 + (1 - prev_abar - sigma**2).sqrt() * output[row]
        density = torch.distributions.Normal(mean, sigma).log_prob(target[row].double())
        assert log_probs[row].item() == pytest.approx(density.mean().item(), rel=1e-5)


def test_zero_variance_transition_is_deterministic() -> None:
    ddim = scheduler("epsilon", steps=4)
    generator = torch.Generator().manual_seed(2)
    sample, output, noise = (torch.randn(1, 1, 2, 2, generator=generator) for _ in range(3))
    # From timestep 0 the previous cumulative alpha is alphas_cumprod[0] itself: sigma = 0.
    timestep = torch.tensor([0])
    stepped, log_prob = ddim_transition(ddim, output, timestep, sample, 1.0, noise=noise)
    expected = ddim.step(output, 0, sample, eta=0.0).prev_sample
    torch.testing.assert_close(stepped, expected)
    assert log_prob.item() == 0.0


def test_clipped_loss_matches_ppo_by_hand() -> None:
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, +1, -1 and epsilon 0.2:
    # per-transition max(-A r, -A clip(r)) = -1.2, 1.5, -0.5, 0.8.
    old = torch.zeros(4)
    new = torch.tensor([1.5, 1.5, 0.5, 0.5]).log().requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, diagnostics = clipped_policy_loss(new, old, advantages, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert diagnostics["clip_fraction"].item() == 1.0
    loss.backward()
    # The clipped terms (first and last) pass no gradient; d(-A r)/d log r = -A r for the others.
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 1.5, -0.5, 0.0]) / 4)


def test_reward_statistics_per_prompt_by_hand() -> None:
    statistics = PromptRewardStatistics(buffer_size=3, min_count=2)
    # First call: "a" has two rewards (its own statistics), "b" one (the batch's).
    first = statistics.advantages(["a", "b", "a"], torch.tensor([1.0, 4.0, 3.0]))
    batch_std = torch.tensor([1.0, 4.0, 3.0]).std(unbiased=False).item()
    expected = [-1.0, (4.0 - 8.0 / 3.0) / batch_std, 1.0]
    assert first.tolist() == pytest.approx(expected, rel=1e-5)
    # Second call: "a" contains [1, 3] plus 5; a fourth reward would push out the 1.
    second = statistics.advantages(["a"], torch.tensor([5.0]))
    history = torch.tensor([1.0, 3.0, 5.0])
    expected = (5.0 - history.mean()) / history.std(unbiased=False)
    assert second.item() == pytest.approx(expected.item(), rel=1e-5)
    restored = PromptRewardStatistics(buffer_size=3, min_count=2)
    restored.load_state_dict(statistics.state_dict())
    statistics.advantages(["a"], torch.tensor([7.0]))
    assert statistics.state_dict() == {"a": [3.0, 5.0, 7.0], "b": [4.0]}
    assert restored.state_dict() == {"a": [1.0, 3.0, 5.0], "b": [4.0]}


# The tiny text encoder with dropout, which must stay off while the frozen encoder embeds
# the prompts of rollouts and of training steps alike.
DROPOUT_TEXT = Backbone(
    config={**TINY_TEXT.config, "attention_dropout": 0.5, "dropout": 0.5},
    tokenizer=TINY_TEXT.tokenizer,
)


def tiny_ddpo(scorer_dir: Path, text_encoder: Backbone = TINY_TEXT, **overrides) -> DDPO:
    torch.manual_seed(0)
    components = DiffusionComponents(
        unet=dict(TINY_UNET), text_encoder=text_encoder, scheduler={"num_train_timesteps": 100}
    )
    arguments = {
        "reward_model": str(scorer_dir),
        "samples_per_epoch": 3,
        "sample_batch_size": 2,
        "train_batch_size": 2,
        "inner_epochs": 2,
        "steps_per_trajectory": 2,
        "num_inference_steps": 3,
        "max_prompt_length": 8,
        "guidance_scale": 2.0,
        "learning_rate": 1e-3,
        "stat_min_count": 1,
        **overrides,
    }
    return DDPO(components, **arguments)


def test_rollout_batches_follow_ddpo_order(scorer_dir: Path) -> None:
    model = tiny_ddpo(scorer_dir)
    batches = list(model.rollout_batches(PROMPTS, torch.Generator().manual_seed(0)))
    # 2 inner epochs x 2 minibatches (2 + 1 trajectories) x 2 steps.
    assert len(batches) == model.rollout_batch_count() == 8
    assert [len(batch["prompts"]) for batch in batches] == [2, 2, 1, 1] * 2
    first, second = batches[0], batches[1]
    # The same trajectories at two different steps, each a pair of consecutive latents.
    assert first["prompts"] == second["prompts"]
    stochastic = model.sampling_scheduler().timesteps[model.stochastic_steps()].tolist()
    for batch in batches:
        assert set(batch["timesteps"].tolist()) <= set(stochastic)
    for row in range(2):  # every trajectory at two distinct stochastic steps
        assert first["timesteps"][row] != second["timesteps"][row]
    assert set(model.rollout_metrics) == {
        "reward",
        "reward_std",
        "reward/prompt_following",
        "reward/fidelity",
    }


def test_importance_ratio_is_one_before_any_update(scorer_dir: Path) -> None:
    model = tiny_ddpo(
        scorer_dir, DROPOUT_TEXT, sample_batch_size=3, train_batch_size=3, inner_epochs=1
    )
    model.train()
    for batch in model.rollout_batches(PROMPTS, torch.Generator().manual_seed(0)):
        with torch.no_grad():
            log_probs = model.log_probabilities(batch)
        # Same weights and inputs as at sampling; only the batch arrangement differs,
        # which may change float rounding, hence the 1e-6 tolerance.
        torch.testing.assert_close(log_probs, batch["log_probs"], atol=1e-6, rtol=0)
        _, diagnostics = clipped_policy_loss(
            log_probs, batch["log_probs"], batch["advantages"], 1e-4
        )
        assert diagnostics["ratio"].item() == pytest.approx(1.0, abs=1e-6)


def test_rollout_dataset_draws_prompts_per_epoch(
    scorer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_ddpo(scorer_dir, inner_epochs=1, samples_per_epoch=6)
    dataset = RolloutDataset(model, [f"the digit {d}" for d in range(10)], seed=0)

    def draws() -> list[str]:
        return [p for batch in dataset for p in batch["prompts"]]

    first = draws()
    assert draws() == first  # the same epoch draws the same prompts
    assert len(dataset) == 6
    assert len(first) == 6 * 2  # each trajectory at 2 steps
    monkeypatch.setattr(DDPO, "current_epoch", property(lambda self: 1))
    assert draws() != first


def _fit(scorer_dir: Path, root: Path, max_epochs: int, ckpt_path: str | None = None) -> DDPO:
    model = tiny_ddpo(scorer_dir)
    data = RolloutDataModule(DigitsPromptDataModule(num_train_prompts=6, batch_size=3), seed=1)
    # Without RngStateCheckpoint: rollouts draw from their own generator, so resuming
    # needs no stored global RNG state.
    trainer = fit_quietly(
        model, data, root, max_epochs, ckpt_path, store_rng=False, accumulate_grad_batches=2
    )
    # 8 batches per epoch, one optimizer step per 2.
    assert trainer.global_step == 4 * max_epochs
    return model


def test_fit_trains_and_resume_reproduces(scorer_dir: Path, tmp_path: Path) -> None:
    before = {
        name: value.clone() for name, value in tiny_ddpo(scorer_dir).unet.state_dict().items()
    }
    straight = _fit(scorer_dir, tmp_path / "straight", max_epochs=2)
    first = _fit(scorer_dir, tmp_path / "first", max_epochs=1)
    resumed = _fit(scorer_dir, tmp_path / "resumed", 2, str(tmp_path / "first" / "last.ckpt"))
    assert resumed.reward_statistics.state_dict() == straight.reward_statistics.state_dict()
    changed = 0
    for name, expected in straight.unet.state_dict().items():
        assert torch.equal(resumed.unet.state_dict()[name], expected), name
        changed += not torch.equal(first.unet.state_dict()[name], expected)
    assert changed > 0  # the second epoch trained, so the comparison is not trivial
    assert any(not torch.equal(before[n], v) for n, v in first.unet.state_dict().items())
    assert straight.rollout_metrics["reward"] == pytest.approx(resumed.rollout_metrics["reward"])


def test_invalid_arguments_are_named(scorer_dir: Path) -> None:
    with pytest.raises(ValueError, match="steps_per_trajectory=5"):
        tiny_ddpo(scorer_dir, steps_per_trajectory=5)
    with pytest.raises(ValueError, match="clip_range=0"):
        tiny_ddpo(scorer_dir, clip_range=0)
    with pytest.raises(ValueError, match=r"eta=1.5 must be in \(0, 1\]"):
        tiny_ddpo(scorer_dir, eta=1.5)
