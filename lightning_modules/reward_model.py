"""VP-Score: a multi-aspect text-to-image reward model trained on preference rankings.

The design follows ImageReward (Xu et al., 2023) and VisionPrefer (Wu et al., 2024):
an image-text backbone embeds the prompt and the image, and one small head per aspect
(default: prompt-following, aesthetic, fidelity, harmlessness) maps the pair to a
scalar score. Training uses, for each aspect a, the Bradley-Terry loss over every
ordered pair (i, j) of images of the same prompt with rating_i > rating_j:

    L_a = mean over pairs of -log sigmoid(s_a(i) - s_a(j))

Ties and unrated images form no pair. The total loss is sum_a w_a * L_a with the
configured ``aspect_weights``. The overall score is a fixed combination
sum_a c_a * s_a with ``overall_weights`` (default: equal weights summing to 1); it is
configured rather than learned because the rankings rate aspects, not overall quality.

The head input is [v, t, v * t] with v and t the L2-normalized image and text
embeddings of a dual encoder with ``get_image_features`` and ``get_text_features``
(CLIP, or a BLIP checkpoint in ``BlipModel`` layout). The product term lets a small
head measure agreement between prompt and image. ImageReward itself fuses prompt and
image with BLIP's cross-attention text encoder, which this module does not implement.

Scorer API (used by ReFL, DDPO and Diffusion-DPO): ``score(prompts, images)`` returns
[B, A] aspect scores and ``overall(prompts, images)`` the [B] combination. Images are
float tensors [B, 3, H, W] with pixel values in [0, 1]; resizing, center cropping and
normalization to the backbone's statistics happen inside, in torch, so both scores are
differentiable with respect to the pixels.

Notation: G prompts, N images, A aspects, D embedding size.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.image_preference import DEFAULT_ASPECTS, PreferenceBatch
from lightning_modules.adapters import (
    AdapterHooks,
    BitFit,
    adapter_config,
    apply_adapter,
    describe_adapter,
    merge_adapter,
)
from lightning_modules.backbones import Backbone, load_model, load_tokenizer, resolve_location
from lightning_modules.metrics.preference import (
    PairwiseAccuracy,
    PromptSpearman,
    preference_pairs,
)

log = logging.getLogger(__name__)

EXPORT_BACKBONE = "backbone"
EXPORT_HEADS = "heads.safetensors"
EXPORT_CONFIG = "vp_score.json"
# Pixel values may leave [0, 1] by float rounding after a resize or a decoder.
PIXEL_TOLERANCE = 1e-3


@dataclass
class ImagePreprocessing:
    """Mapping of [0, 1] pixels to backbone input: resize, center crop, normalize.

    Args:
        size: length of the shorter image side after resizing (bicubic, antialiased).
        crop_size: side of the square center crop taken after resizing.
        mean: per-channel mean subtracted after cropping.
        std: per-channel standard deviation divided by after subtracting the mean.
    """

    size: int
    crop_size: int
    mean: list[float]
    std: list[float]

    def __call__(self, images: Tensor) -> Tensor:
        """Return [B, 3, crop_size, crop_size] normalized pixels; differentiable."""
        height, width = images.shape[-2:]
        scale = self.size / min(height, width)
        resized_height = max(self.crop_size, round(height * scale))
        resized_width = max(self.crop_size, round(width * scale))
        if (resized_height, resized_width) != (height, width):
            images = F.interpolate(
                images,
                size=(resized_height, resized_width),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
        top = (resized_height - self.crop_size) // 2
        left = (resized_width - self.crop_size) // 2
        images = images[..., top : top + self.crop_size, left : left + self.crop_size]
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std


def _default_preprocessing(spec: Backbone, model: nn.Module) -> ImagePreprocessing:
    """Read the preprocessing of a pretrained backbone, else derive it from its config."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if spec.pretrained is not None:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(resolve_location(spec.pretrained))
        except (OSError, ValueError) as error:
            log.warning(
                "No image processor loaded from %s (%s); using the config's image size and "
                "CLIP's normalization statistics. Pass preprocessing to set them.",
                spec.pretrained,
                error,
            )
            processor = None
        if processor is not None:
            size = processor.size
            shorter = size.get("shortest_edge") or min(size["height"], size["width"])
            crop = processor.crop_size if getattr(processor, "do_center_crop", False) else None
            crop_size = min(crop["height"], crop["width"]) if crop else shorter
            return ImagePreprocessing(
                shorter, crop_size, list(processor.image_mean), list(processor.image_std)
            )
    image_size = model.config.vision_config.image_size
    return ImagePreprocessing(image_size, image_size, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD))


def _embedding(output: Any) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected
    # embedding; earlier versions returned the tensor itself.
    return output if isinstance(output, Tensor) else output.pooler_output


def bradley_terry_loss(scores: Tensor, preferred: Tensor) -> Tensor:
    """Mean of -log sigmoid(s_i - s_j) over the pairs where ``preferred[i, j]`` is True.

    Returns a zero that keeps the graph when there is no pair.

    Args:
        scores: [N] scores of one aspect.
        preferred: [N, N] pairs from :func:`preference_pairs`.
    """
    if not preferred.any():
        return scores.sum() * 0.0
    difference = scores.unsqueeze(1) - scores.unsqueeze(0)  # [N, N]
    return F.softplus(-difference[preferred]).mean()


class VPScore(AdapterHooks):
    """Multi-aspect text-to-image reward model (see the module docstring).

    Args:
        backbone: image-text dual encoder (``pretrained`` name/dir or inline ``config``),
            loaded with ``AutoModel``: CLIP, or BLIP in ``BlipModel`` layout. BLIP
            retrieval checkpoints (``BlipForImageTextRetrieval``) name their weights
            differently and would load mostly untrained; they are not supported.
        aspects: names of the rated aspects, one head each, in the order of the
            datamodule's rating columns; None gives the four of ``DEFAULT_ASPECTS``.
        aspect_weights: loss weight per aspect; None weights all aspects 1.
        overall_weights: weights of the overall score sum_a c_a * s_a; None gives
            every aspect 1 / A.
        hidden_dim: hidden size of each aspect head.
        dropout: dropout inside the heads.
        learning_rate: AdamW learning rate of the heads.
        backbone_learning_rate: AdamW learning rate of the backbone (or its adapter).
        weight_decay: AdamW weight decay.
        preprocessing: image preprocessing; None reads it from the pretrained image
            processor, or uses the config's ``vision_config.image_size`` and CLIP's
            normalization statistics for an inline config.
        peft: a peft config or ``BitFit`` for the backbone; None trains all of it.
    """

    def __init__(
        self,
        backbone: Backbone,
        aspects: list[str] | None = None,
        aspect_weights: list[float] | None = None,
        overall_weights: list[float] | None = None,
        hidden_dim: int = 512,
        dropout: float = 0.1,
        learning_rate: float = 1e-4,
        backbone_learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        preprocessing: ImagePreprocessing | None = None,
        peft: peft.PeftConfig | BitFit | None = None,
    ):
        super().__init__()
        from transformers import AutoModel

        spec = Backbone.coerce(backbone)
        if isinstance(preprocessing, dict):  # as stored in a checkpoint's hyper-parameters
            preprocessing = ImagePreprocessing(**preprocessing)
        aspects = list(DEFAULT_ASPECTS if aspects is None else aspects)
        aspect_weights = [1.0] * len(aspects) if aspect_weights is None else list(aspect_weights)
        if overall_weights is None:
            overall_weights = [1.0 / len(aspects)] * len(aspects) if aspects else []
        self._check_arguments(aspects, aspect_weights, list(overall_weights), hidden_dim)
        if spec.dtype != "float32":
            raise ValueError(
                f"Invalid VPScore arguments: backbone dtype {spec.dtype!r}. The heads and the "
                "image preprocessing run in float32, so keep the backbone in float32 and use "
                "trainer.precision bf16-mixed for lower precision."
            )

        self.backbone = apply_adapter(load_model(spec, AutoModel), peft)
        self.backbone.train()
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(self.backbone, method):
                raise TypeError(
                    f"VPScore needs an image-text dual encoder with {method}(); "
                    f"{type(self.backbone).__name__} has none. Use CLIP or BLIP (BlipModel)."
                )
        # CLIP's contrastive temperature is not used by get_*_features; a trainable
        # parameter without gradient would make DDP raise unless find_unused_parameters.
        if isinstance(getattr(self.backbone, "logit_scale", None), nn.Parameter):
            self.backbone.logit_scale.requires_grad_(False)
        self.tokenizer = load_tokenizer(spec)
        if preprocessing is None:
            preprocessing = _default_preprocessing(spec, self.backbone)
        self.preprocessing = preprocessing

        self.save_hyperparameters(ignore=["backbone", "peft", "preprocessing"])
        self.hparams["backbone"] = spec.to_dict()
        self.hparams["peft"] = describe_adapter(peft)
        self.hparams["preprocessing"] = asdict(preprocessing)
        self.hparams["aspects"] = aspects
        self.hparams["aspect_weights"] = aspect_weights
        self.hparams["overall_weights"] = list(overall_weights)

        embedding_dim = self.backbone.config.projection_dim
        self.heads = nn.ModuleDict(
            {
                aspect: nn.Sequential(
                    nn.Linear(3 * embedding_dim, hidden_dim),
                    nn.GELU(),
                    nn.Dropout(dropout),
                    nn.Linear(hidden_dim, 1),
                )
                for aspect in aspects
            }
        )
        self.register_buffer("overall_weights", torch.tensor(overall_weights), persistent=False)
        self.metrics = nn.ModuleDict({split: self._make_metrics() for split in ("val", "test")})

    @staticmethod
    def _check_arguments(
        aspects: list[str],
        aspect_weights: list[float],
        overall_weights: list[float],
        hidden_dim: int,
    ) -> None:
        problems = []
        if not aspects:
            problems.append("aspects is empty; name at least one aspect")
        if len(set(aspects)) != len(aspects):
            problems.append(f"aspects={aspects} contains duplicates")
        if len(aspect_weights) != len(aspects):
            problems.append(
                f"aspect_weights={aspect_weights} has {len(aspect_weights)} entries for "
                f"{len(aspects)} aspects {aspects}"
            )
        elif any(weight < 0 for weight in aspect_weights) or not any(aspect_weights):
            problems.append(
                f"aspect_weights={aspect_weights} must be non-negative with at least one positive"
            )
        if len(overall_weights) != len(aspects):
            problems.append(
                f"overall_weights={overall_weights} has {len(overall_weights)} entries for "
                f"{len(aspects)} aspects {aspects}"
            )
        if hidden_dim < 1:
            problems.append(f"hidden_dim={hidden_dim} must be at least 1")
        if problems:
            raise ValueError("Invalid VPScore arguments: " + "; ".join(problems) + ".")

    def _make_metrics(self) -> nn.ModuleDict:
        metrics = {f"acc/{aspect}": PairwiseAccuracy() for aspect in self.aspects}
        metrics["acc/overall"] = PairwiseAccuracy()
        metrics.update({f"spearman/{aspect}": PromptSpearman() for aspect in self.aspects})
        return nn.ModuleDict(metrics)

    @property
    def aspects(self) -> list[str]:
        """Names of the scored aspects, in column order."""
        return list(self.hparams.aspects)

    # ------------------------------------------------------------------ scoring

    def check_pixels(self, images: Tensor) -> None:
        """Raise ValueError unless ``images`` is a float [B, 3, H, W] tensor with values in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must have shape [B, 3, H, W], got {list(images.shape)}; "
                "stack RGB images channels-first."
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}; "
                "convert uint8 images with images.float() / 255."
            )
        low, high = images.min().item(), images.max().item()
        if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
            raise ValueError(
                f"images must have pixel values in [0, 1], got min {low:.4f} and max {high:.4f}; "
                "map [-1, 1] decoder output with (x + 1) / 2, or divide 0-255 values by 255."
            )

    def embed_prompts(self, prompts: list[str]) -> Tensor:
        """Return [G, D] L2-normalized text embeddings."""
        max_length = getattr(self.backbone.config.text_config, "max_position_embeddings", 77)
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(self.device)
        output = self.backbone.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return F.normalize(_embedding(output), dim=-1)

    def embed_images(self, images: Tensor) -> Tensor:
        """Return [N, D] L2-normalized image embeddings of [0, 1] pixels."""
        self.check_pixels(images)
        pixels = self.preprocessing(images.to(self.device, self.dtype))
        output = self.backbone.get_image_features(pixel_values=pixels)
        return F.normalize(_embedding(output), dim=-1)

    def score_embeddings(self, text: Tensor, image: Tensor) -> Tensor:
        """Return [N, A] aspect scores of paired text [N, D] and image [N, D] embeddings.

        The heads run in their own dtype (float32) even under bf16 autocast: bf16 scores tie often enough
        to distort pairwise accuracies and the rewards other methods optimize.
        """
        head_dtype = self.heads[self.aspects[0]][0].weight.dtype
        features = torch.cat([image, text, image * text], dim=-1).to(head_dtype)  # [N, 3D]
        with torch.autocast(device_type=features.device.type, enabled=False):
            return torch.cat([self.heads[aspect](features) for aspect in self.aspects], dim=-1)

    def score(self, prompts: list[str], images: Tensor) -> Tensor:
        """Return [B, A] aspect scores of ``images`` [B, 3, H, W] (in [0, 1]) for ``prompts``.

        One prompt per image. Differentiable with respect to ``images``.
        """
        if len(prompts) != len(images):
            raise ValueError(
                f"score() takes one prompt per image, got {len(prompts)} prompts and "
                f"{len(images)} images."
            )
        return self.score_embeddings(self.embed_prompts(prompts), self.embed_images(images))

    def combine(self, aspect_scores: Tensor) -> Tensor:
        """Return the [B] overall score sum_a c_a * s_a of [B, A] aspect scores."""
        return aspect_scores @ self.overall_weights.to(aspect_scores.dtype)

    def overall(self, prompts: list[str], images: Tensor) -> Tensor:
        """Return the [B] overall score of ``images`` for ``prompts``; differentiable."""
        return self.combine(self.score(prompts, images))

    # ------------------------------------------------------------------ training

    def forward(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Return (weighted loss, per-aspect loss, [N, A] scores) of a batch."""
        if list(batch.aspects) != self.aspects:
            raise ValueError(
                f"the data's aspects {list(batch.aspects)} differ from the model's {self.aspects}; "
                "set the same aspects list, in the same order, in model and data."
            )
        text = self.embed_prompts(batch.prompts)[batch.group]  # [N, D]
        scores = self.score_embeddings(text, self.embed_images(batch.images))  # [N, A]
        losses = {}
        for column, aspect in enumerate(self.aspects):
            preferred = preference_pairs(batch.ratings[:, column], batch.group)
            losses[aspect] = bradley_terry_loss(scores[:, column], preferred)
        weights = self.hparams.aspect_weights
        loss = sum(
            weight * losses[aspect] for weight, aspect in zip(weights, self.aspects, strict=True)
        )
        return loss, losses, scores

    def training_step(self, batch: PreferenceBatch, batch_index: int) -> Tensor:
        loss, losses, _ = self(batch)
        size = len(batch.prompts)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for aspect, value in losses.items():
            self.log(f"train/loss/{aspect}", value, batch_size=size)
        return loss

    def _evaluation_step(self, batch: PreferenceBatch, split: str) -> None:
        loss, _, scores = self(batch)
        self.log(f"{split}/loss", loss, batch_size=len(batch.prompts), sync_dist=True)
        metrics = self.metrics[split]
        for column, aspect in enumerate(self.aspects):
            ratings = batch.ratings[:, column]
            metrics[f"acc/{aspect}"].update(
                scores[:, column], preference_pairs(ratings, batch.group)
            )
            metrics[f"spearman/{aspect}"].update(scores[:, column], ratings, batch.group)
        metrics["acc/overall"].update(
            self.combine(scores), dominance_pairs(batch.ratings, batch.group)
        )

    def validation_step(self, batch: PreferenceBatch, batch_index: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_index: int) -> None:
        self._evaluation_step(batch, "test")

    def _log_epoch_metrics(self, split: str) -> None:
        values = {}
        # Every metric is computed on every process, because compute() synchronizes the
        # sums across processes; one with no pairs or prompts anywhere returns NaN.
        for name, metric in self.metrics[split].items():
            value = metric.compute()
            metric.reset()
            if not torch.isnan(value):
                values[f"{split}/{name}"] = value.float()
        accuracies = [
            values[f"{split}/acc/{aspect}"]
            for aspect in self.aspects
            if f"{split}/acc/{aspect}" in values
        ]
        if accuracies:
            values[f"{split}/acc/mean"] = torch.stack(accuracies).mean()
        self.log_dict(values)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [p for p in self.heads.parameters() if p.requires_grad]
        groups = [{"params": heads, "lr": self.hparams.learning_rate}]
        if backbone:
            groups.append({"params": backbone, "lr": self.hparams.backbone_learning_rate})
        return torch.optim.AdamW(groups, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ export

    def export_artifact(self, directory: Path) -> None:
        """Write backbone (``save_pretrained``, adapter merged), heads and ``vp_score.json``."""
        import copy

        from safetensors.torch import save_file

        directory = Path(directory)
        backbone = self.backbone
        if adapter_config(backbone) is not None:
            backbone = merge_adapter(copy.deepcopy(backbone))
        backbone.save_pretrained(directory / EXPORT_BACKBONE, safe_serialization=True)
        self.tokenizer.save_pretrained(directory / EXPORT_BACKBONE)
        heads = {
            f"heads.{name}": tensor.detach().cpu().contiguous()
            for name, tensor in self.heads.state_dict().items()
        }
        save_file(heads, str(directory / EXPORT_HEADS))
        config = {
            key: self.hparams[key]
            for key in (
                "aspects",
                "aspect_weights",
                "overall_weights",
                "hidden_dim",
                "preprocessing",
            )
        }
        config["dtype"] = self.hparams.backbone["dtype"]
        (directory / EXPORT_CONFIG).write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )

    @classmethod
    def from_export(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> VPScore:
        """Load an exported scorer in eval mode: ``VPScore.from_export(dir).score(prompts, images)``."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / EXPORT_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found: {directory} is not a VP-Score export directory "
                f"(export_artifact writes {EXPORT_CONFIG}, {EXPORT_HEADS} and {EXPORT_BACKBONE}/)."
            )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model = cls(
            backbone=Backbone(pretrained=str(directory / EXPORT_BACKBONE), dtype=config["dtype"]),
            aspects=config["aspects"],
            aspect_weights=config["aspect_weights"],
            overall_weights=config["overall_weights"],
            hidden_dim=config["hidden_dim"],
            preprocessing=ImagePreprocessing(**config["preprocessing"]),
        )
        missing, unexpected = model.load_state_dict(
            load_file(str(directory / EXPORT_HEADS)), strict=False
        )
        missing = [name for name in missing if name.startswith("heads.")]
        if missing or unexpected:
            raise ValueError(
                f"{directory / EXPORT_HEADS} does not match the aspects {config['aspects']}: "
                f"missing {missing}, unexpected {unexpected}. Re-export the model."
            )
        return model.to(map_location).eval()


def dominance_pairs(ratings: Tensor, group: Tensor) -> Tensor:
    """Pairs where item i is rated at least as high as j on every rated aspect and higher on one.

    Used for the accuracy of the overall score: it must prefer an image that no aspect
    rates worse. Aspects that either item lacks are ignored; a pair with no aspect
    rated on both sides is not a pair.

    Args:
        ratings: [N, A] ratings, higher is better, NaN where unrated.
        group: [N] prompt index of each item.
    """
    first = ratings.unsqueeze(1)  # [N, 1, A]
    second = ratings.unsqueeze(0)  # [1, N, A]
    both_rated = ~(torch.isnan(first) | torch.isnan(second))  # [N, N, A]
    not_worse = ((first >= second) | ~both_rated).all(dim=-1)
    better_somewhere = ((first > second) & both_rated).any(dim=-1)
    same_prompt = group.unsqueeze(1) == group.unsqueeze(0)
    return same_prompt & not_worse & better_somewhere


def load_scorer(directory: str | Path, map_location: str | torch.device = "cpu") -> VPScore:
    """Load an exported VP-Score: the one-line entry point for other methods."""
    return VPScore.from_export(directory, map_location)


__all__ = [
    "DEFAULT_ASPECTS",
    "ImagePreprocessing",
    "VPScore",
    "bradley_terry_loss",
    "dominance_pairs",
    "load_scorer",
]
