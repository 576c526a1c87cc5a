"""Diffusion-DPO: the loss by hand, pairs from ratings, shared noise, the frozen reference,
on-policy pairs, LoRA and resume."""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch

from datamodules.image_preference import ImagePreferenceDataModule, PreferenceBatch
from datamodules.text_image import DigitsPromptDataModule, PreferenceTrainingDataModule
from lightning_modules.diffusion_dpo import DiffusionDPO, diffusion_dpo_loss, pairs_from_ratings
from lightning_modules.text_to_image import DiffusionComponents
from tests.conftest import fit_quietly
from tests.test_image_preference import _write_dataset
from tests.test_text_to_image import TINY_TEXT, TINY_UNET

LORA = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def tiny_dpo(**overrides) -> DiffusionDPO:
    torch.manual_seed(0)
    components = DiffusionComponents(
        unet=dict(TINY_UNET), text_encoder=TINY_TEXT, scheduler={"num_train_timesteps": 100}
    )
    arguments = {
        "beta": 50.0,
        "num_inference_steps": 3,
        "max_prompt_length": 8,
        "learning_rate": 1e-3,
        **overrides,
    }
    return DiffusionDPO(components, **arguments)


def test_loss_by_hand() -> None:
    # beta 10: r_w = -5 (0.10 - 0.20) = 0.5, r_l = -5 (0.30 - 0.25) = -0.25, margin 0.75.
    loss, diagnostics = diffusion_dpo_loss(
        torch.tensor([0.10]), torch.tensor([0.30]), torch.tensor([0.20]), torch.tensor([0.25]), 10.0
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.75)), rel=1e-6)
    assert diagnostics["rewards/chosen"].item() == pytest.approx(0.5)
    assert diagnostics["rewards/rejected"].item() == pytest.approx(-0.25)
    assert diagnostics["rewards/margins"].item() == pytest.approx(0.75)
    assert diagnostics["rewards/accuracies"].item() == 1.0


def test_pairs_from_ratings_worked_example() -> None:
    nan = float("nan")
    batch = PreferenceBatch(
        prompts=["p0", "p1"],
        images=torch.zeros(6, 3, 2, 2),
        group=torch.tensor([0, 0, 0, 1, 1, 1]),
        # Two aspects; their mean combines them, a NaN aspect is left out of the mean.
        ratings=torch.tensor(
            [[3.0, 3.0], [1.0, 1.0], [2.0, nan], [5.0, 1.0], [3.0, 3.0], [nan, nan]]
        ),
        aspects=("a", "b"),
    )
    prompts, preferred, dispreferred = pairs_from_ratings(batch)
    # Group 0 means 3, 1, 2: pairs (0, 1), (0, 2), (2, 1). Group 1: 3 and 3 tie; 5 is unrated.
    assert sorted(zip(preferred.tolist(), dispreferred.tolist(), strict=True)) == [
        (0, 1),
        (0, 2),
        (2, 1),
    ]
    assert prompts == ["p0"] * 3
    # Weighted: group 1 becomes 5 vs 3, so image 3 beats image 4.
    _, preferred, dispreferred = pairs_from_ratings(batch, rating_weights=[1.0, 0.0])
    assert (3, 4) in zip(preferred.tolist(), dispreferred.tolist(), strict=True)
    torch.manual_seed(0)
    prompts, _, _ = pairs_from_ratings(batch, max_pairs_per_prompt=1)
    assert prompts == ["p0"]


def test_pair_images_share_noise_and_timestep() -> None:
    model = tiny_dpo()
    seen = []
    handle = model.unet.register_forward_hook(lambda m, inputs, output: seen.append(inputs[:2]))
    preferred, dispreferred = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    model.pair_loss(["a", "b"], preferred, dispreferred)
    handle.remove()
    noisy, timesteps = seen[0]
    assert torch.equal(timesteps[:2], timesteps[2:])
    abar = model.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x0 = torch.cat([preferred, dispreferred]) * 2 - 1
    noise = (noisy - abar.sqrt() * x0) / (1 - abar).sqrt()
    torch.testing.assert_close(noise[:2], noise[2:], atol=1e-5, rtol=1e-5)


def test_initial_loss_is_log_two() -> None:
    model = tiny_dpo()
    loss, diagnostics = model.pair_loss(["a"], torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    # Policy and reference are the same model before training: margin 0, loss log 2.
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert diagnostics["rewards/margins"].item() == 0.0
    # Full fine-tuning keeps a frozen copy; LoRA switches its adapter off instead.
    assert model.reference_unet is not None
    assert not any(p.requires_grad for p in model.reference_unet.parameters())
    assert tiny_dpo(peft=LORA).reference_unet is None


@pytest.mark.parametrize("adapter", [None, LORA], ids=["full", "lora"])
def test_margin_uses_the_reference(adapter) -> None:
    model = tiny_dpo(peft=adapter)
    base = tiny_dpo()  # the starting weights, without adapter
    with torch.no_grad():
        for parameter in model.unet.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))  # the policy moves
    seen = []
    handle = model.unet.register_forward_hook(lambda m, inputs, output: seen.append(inputs))
    preferred, dispreferred = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    _, diagnostics = model.pair_loss(["a", "b"], preferred, dispreferred)
    handle.remove()
    noisy, timesteps = seen[0][:2]
    text = model.encode_prompts(["a", "b"] * 2)
    abar = model.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x0 = torch.cat([preferred, dispreferred]) * 2 - 1
    noise = (noisy - abar.sqrt() * x0) / (1 - abar).sqrt()
    with torch.no_grad():
        policy = model.denoising_errors(model.unet, noisy, timesteps, text, noise)
        reference = base.denoising_errors(base.unet, noisy, timesteps, text, noise)
    # margin = -beta / 2 [(policy_w - policy_l) - (reference_w - reference_l)], beta 50.
    margins = -25.0 * ((policy[:2] - policy[2:]) - (reference[:2] - reference[2:]))
    assert abs(margins.mean().item()) > 1e-3  # the check is not trivial
    assert diagnostics["rewards/margins"].item() == pytest.approx(margins.mean().item(), rel=1e-3)


def test_lora_reference_is_the_adapter_free_base() -> None:
    model = tiny_dpo(peft=LORA)
    base = tiny_dpo()  # the same seed: the same base weights, no adapter
    for name, parameter in model.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)  # the adapter now changes the output
    noisy, timesteps, text = torch.randn(2, 3, 8, 8), torch.tensor([10, 60]), torch.randn(2, 8, 16)
    with torch.no_grad():
        adapted = model.unet(noisy, timesteps, encoder_hidden_states=text).sample
        expected = base.unet(noisy, timesteps, encoder_hidden_states=text).sample
        from lightning_modules.adapters import adapters_disabled

        with adapters_disabled(model.unet):
            reference = model.unet(noisy, timesteps, encoder_hidden_states=text).sample
        after = model.unet(noisy, timesteps, encoder_hidden_states=text).sample
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(adapted, expected)
    torch.testing.assert_close(after, adapted)  # switched back on after the block
    assert all(p.requires_grad for n, p in model.unet.named_parameters() if "lora_" in n)


def test_on_policy_pairs_are_best_and_worst(scorer_dir: Path) -> None:
    model = tiny_dpo(
        pairs_from="samples",
        reward_model=str(scorer_dir),
        prompts_per_epoch=3,
        samples_per_prompt=3,
        sample_batch_size=4,
        train_batch_size=2,
        inner_epochs=2,
    )
    prompts = ["a handwritten digit one", "the digit 7", "a handwritten digit two"]
    batches = list(model.rollout_batches(prompts, torch.Generator().manual_seed(0)))
    assert len(batches) == model.rollout_batch_count() == 4
    assert sorted(p for batch in batches[:2] for p in batch["prompts"]) == sorted(prompts)
    for batch in batches:
        with torch.no_grad():
            best, _ = model.rewards(batch["prompts"], batch["preferred"])
            worst, _ = model.rewards(batch["prompts"], batch["dispreferred"])
        assert (best >= worst).all()
    metrics = model.rollout_metrics
    assert metrics["reward/chosen"] >= metrics["reward"] >= metrics["reward/rejected"]


def _fit(root: Path, max_epochs: int, ckpt_path: str | None = None, **overrides) -> DiffusionDPO:
    model = tiny_dpo(**overrides)
    train_file = _write_dataset(root / "data", 4)
    data = PreferenceTrainingDataModule(
        preferences=ImagePreferenceDataModule(
            train_file=str(train_file), image_size=8, batch_size=2
        ),
        prompts=DigitsPromptDataModule(num_train_prompts=2, batch_size=2),
    )
    trainer = fit_quietly(model, data, root, max_epochs, ckpt_path)
    assert trainer.global_step == 2 * max_epochs
    return model


def test_lora_fit_trains_the_adapter_only(tmp_path: Path) -> None:
    before = {n: p.clone() for n, p in tiny_dpo(peft=LORA).unet.named_parameters()}
    model = _fit(tmp_path, 1, peft=LORA)
    for name, parameter in model.unet.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == ("lora_" in name), name


def test_full_fit_frozen_reference_and_resume(tmp_path: Path) -> None:
    reference = {n: p.clone() for n, p in tiny_dpo().unet.named_parameters()}
    straight = _fit(tmp_path / "straight", 2)
    for name, parameter in straight.reference_unet.named_parameters():
        assert torch.equal(parameter, reference[name]), name
    first = _fit(tmp_path / "first", 1)
    resumed = _fit(tmp_path / "resumed", 2, str(tmp_path / "first" / "last.ckpt"))
    changed = 0
    for name, expected in straight.unet.state_dict().items():
        assert torch.equal(resumed.unet.state_dict()[name], expected), name
        changed += not torch.equal(first.unet.state_dict()[name], expected)
    assert changed > 0


def test_invalid_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="set reward_model"):
        tiny_dpo(pairs_from="samples")
    with pytest.raises(ValueError, match="samples_per_prompt=1 must be at least 2"):
        tiny_dpo(samples_per_prompt=1)
    with pytest.raises(ValueError, match="beta=0"):
        tiny_dpo(beta=0.0)
    with pytest.raises(ValueError, match="max_pairs_per_prompt=0 must be at least 1"):
        tiny_dpo(max_pairs_per_prompt=0)
