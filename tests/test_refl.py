"""ReFL: one grad-enabled denoising step, the reward loss, LoRA, the data stream, resume."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from datamodules.text_image import (
    DigitsPromptDataModule,
    DigitsTextImageDataModule,
    ReFLDataModule,
)
from lightning_modules.refl import ReFL
from lightning_modules.text_to_image import DiffusionComponents
from tests.conftest import fit_quietly
from tests.test_text_to_image import TINY_TEXT, TINY_UNET

PROMPTS = ["a handwritten digit one", "the digit 7"]


def tiny_refl(scorer_dir: Path, **overrides) -> ReFL:
    torch.manual_seed(0)
    components = DiffusionComponents(
        unet=dict(TINY_UNET), text_encoder=TINY_TEXT, scheduler={"num_train_timesteps": 100}
    )
    arguments = {
        "reward_model": str(scorer_dir),
        "t1": 2,
        "t2": 3,
        "num_inference_steps": 4,
        "max_prompt_length": 8,
        "learning_rate": 1e-3,
        **overrides,
    }
    return ReFL(components, **arguments)


def test_gradient_flows_through_one_unet_call(scorer_dir: Path) -> None:
    model = tiny_refl(scorer_dir).train()
    calls = []

    def record(module, inputs, output):
        calls.append((torch.is_grad_enabled(), inputs[0].grad_fn is None))

    handle = model.unet.register_forward_hook(record)
    x0, latents, _ = model.sample_to_step(PROMPTS, stop=3, seed=0)
    handle.remove()

    # Three no-grad steps, then one step with gradients (both guidance halves in one call).
    assert [enabled for enabled, _ in calls] == [False, False, False, True]
    # The latents entering the grad step carry no graph of the earlier steps.
    assert latents.grad_fn is None
    assert all(no_graph for _, no_graph in calls)
    x0.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())


def test_reward_loss_applies_margin_and_scale(scorer_dir: Path) -> None:
    model = tiny_refl(scorer_dir, reward_margin=2.0, reward_scale=0.5)
    # phi(1) = 1, phi(3) = 0, so the loss is 0.5 * (1 + 0) / 2.
    assert model.reward_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25)


def test_reward_weights_combine_aspects(scorer_dir: Path) -> None:
    model = tiny_refl(scorer_dir, reward_weights=[2.0, -1.0]).eval()
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        reward, scores = model.rewards(PROMPTS, images)
    torch.testing.assert_close(reward, 2.0 * scores[:, 0] - scores[:, 1])

    default = tiny_refl(scorer_dir).eval()
    with torch.no_grad():
        reward, scores = default.rewards(PROMPTS, images)
    torch.testing.assert_close(reward, scores.mean(dim=1))


def test_lora_refl_changes_only_the_adapter(scorer_dir: Path) -> None:
    lora = peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model = tiny_refl(scorer_dir, peft=lora, reward_margin=100.0).train()
    frozen = {
        name: value.detach().clone()
        for name, value in model.named_parameters()
        if not value.requires_grad
    }
    trainable = {
        name: value.detach().clone()
        for name, value in model.named_parameters()
        if value.requires_grad
    }
    assert all(".lora_" in name for name in trainable)
    optimizer = model.configure_optimizers()
    for _ in range(2):
        optimizer.zero_grad()
        batch = {"prompts": PROMPTS, "pretraining": (torch.rand(2, 3, 8, 8), PROMPTS)}
        model.training_step(batch, 0).backward()
        optimizer.step()
    for name, value in model.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    assert any(
        not torch.equal(value, trainable[name])
        for name, value in model.named_parameters()
        if name in trainable
    )
    assert not model.scorer.training


def test_invalid_step_range_rejected(scorer_dir: Path) -> None:
    with pytest.raises(ValueError, match="t1=3 and t2=2"):
        tiny_refl(scorer_dir, t1=3, t2=2)
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        tiny_refl(scorer_dir, t1=1, t2=4)


def test_refl_data_zips_prompts_and_pairs() -> None:
    data = ReFLDataModule(
        prompts=DigitsPromptDataModule(num_train_prompts=12, batch_size=4),
        pretraining=DigitsTextImageDataModule(batch_size=2, repeats=1),
    )
    data.setup("fit")
    # Iterated outside a Trainer, a CombinedLoader yields (batch, batch index, loader index).
    batch, _, _ = next(iter(data.train_dataloader()))
    assert len(batch["prompts"]) == 4
    images, captions = batch["pretraining"]
    assert images.shape == (2, 3, 32, 32)
    assert len(captions) == 2
    assert len(data.prompts.val_prompts) == 60


def _fit(scorer_dir: Path, root: Path, max_epochs: int, ckpt_path: str | None = None) -> ReFL:
    model = tiny_refl(scorer_dir)
    # Two steps per epoch. Lightning resumes exactly at epoch boundaries, where the
    # prompt order depends only on the seed and the epoch.
    data = ReFLDataModule(prompts=DigitsPromptDataModule(num_train_prompts=4, batch_size=2))
    trainer = fit_quietly(model, data, root, max_epochs, ckpt_path)
    assert trainer.global_step == 2 * max_epochs
    return model


def test_resume_reproduces_uninterrupted_run(scorer_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight = _fit(scorer_dir, tmp_path / "straight", max_epochs=2)
    torch.manual_seed(0)
    first = _fit(scorer_dir, tmp_path / "first", max_epochs=1)
    resumed = _fit(scorer_dir, tmp_path / "resumed", 2, str(tmp_path / "first" / "last.ckpt"))
    states = zip(
        straight.unet.state_dict().items(),
        resumed.unet.state_dict().values(),
        first.unet.state_dict().values(),
        strict=True,
    )
    changed = 0
    for (name, expected), actual, interrupted in states:
        assert torch.equal(actual, expected), name
        changed += not torch.equal(interrupted, expected)
    assert changed > 0  # the second epoch trained, so the comparison is not trivial


class _HalfJudge:
    aspects = ("prompt_following",)

    def annotate(self, prompts, images):
        assert images.shape[1:] == (3, 8, 8)
        return {"prompt_following": torch.tensor([0.25, 0.75][: len(prompts)])}


def test_validation_logs_reward_and_judge(scorer_dir: Path) -> None:
    model = tiny_refl(scorer_dir, judge=_HalfJudge())
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    model.validation_step(PROMPTS, 0)
    images = model.generate(PROMPTS, seed=0)
    with torch.no_grad():
        reward, scores = model.rewards(PROMPTS, images)
    assert logged["val/reward"] == pytest.approx(reward.mean().item())
    assert logged["val/reward/fidelity"] == pytest.approx(scores[:, 1].mean().item())
    assert logged["val/judge/prompt_following"] == pytest.approx(0.5)
