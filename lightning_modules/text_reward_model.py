"""A text reward model: a scalar score of a response to a prompt, trained on preference pairs.

A transformer backbone (an encoder such as MiniLM, or a decoder such as SmolLM2)
reads the prompt and the response as one sequence. Its last hidden states are pooled
(the mean over tokens for encoders, the last token for decoders) and a linear head maps
the result to a score s(x, y). Training minimizes the Bradley-Terry loss

    L = mean over pairs of -log sigmoid(s(x, y_chosen) - s(x, y_rejected))

and validation reports the pairwise accuracy (a tie in score counts half).

Input text: with a chat template, the conversation with the response as the final
assistant turn; otherwise "Human: ..." and "Assistant: ..." paragraphs. Sequences
longer than ``max_length`` lose their beginning, so the response is kept.

Scorer API, for TS-Align's student and teacher: ``score(prompts, responses)`` returns the
[B] scores. Export (``export_artifact``): ``backbone/`` (``save_pretrained``; the adapter
merged when there is one), ``tokenizer/``, ``head.safetensors`` and
``text_reward_model.json``; :func:`load_text_scorer` loads it back.

Notation: P pairs, B sequences, T tokens, D hidden size.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Literal

import peft
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from datamodules.text_preference import PreferencePair
from lightning_modules.adapters import (
    AdapterHooks,
    BitFit,
    adapter_config,
    apply_adapter,
    describe_adapter,
    merge_adapter,
)
from lightning_modules.backbones import Backbone, load_model, load_tokenizer
from lightning_modules.causal_lm import Prompt, plain_conversation
from lightning_modules.metrics.preference import PairwiseAccuracy


def pairwise_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Return the Bradley-Terry loss mean(-log sigmoid(chosen - rejected)) over [P] scores."""
    return -F.logsigmoid(chosen - rejected).mean()


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """Pool [B, T, D] hidden states into [B, D]: ``mean`` over tokens, or the ``last`` token.

    ``last`` takes each row's last attended position, so it expects right padding.
    """
    if pooling == "mean":
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    last = attention_mask.sum(dim=1) - 1  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _is_encoder(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class TextRewardModel(AdapterHooks):
    """Score responses to prompts (see the module docstring).

    Args:
        model: the backbone (``pretrained`` name/dir, ``gguf_file``, or inline ``config``),
            loaded with ``AutoModel``.
        pooling: ``mean`` or ``last``; None picks ``mean`` for encoders (model types
            with a masked-LM class in transformers, such as BERT) and ``last`` for the
            others (decoders such as Llama).
        peft: a peft config or ``BitFit`` for the backbone; None trains every parameter.
            The head always trains.
        max_length: maximum tokens per sequence.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        model: Backbone,
        pooling: Literal["mean", "last"] | None = None,
        peft: peft.PeftConfig | BitFit | None = None,
        max_length: int = 512,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        if pooling not in (None, "mean", "last"):
            raise ValueError(f"pooling={pooling!r}; use 'mean', 'last' or None.")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2.")
        spec = Backbone.coerce(model)
        self.tokenizer = load_tokenizer(spec)
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        backbone = load_model(spec)
        if pooling is None:
            pooling = "mean" if _is_encoder(backbone.config.model_type) else "last"
        self.save_hyperparameters(ignore=["model", "peft"])
        self.hparams.update(
            {"model": spec.to_dict(), "peft": describe_adapter(peft), "pooling": pooling}
        )
        self.backbone = apply_adapter(backbone, peft)
        # from_pretrained returns the model in eval mode; training uses its dropout.
        self.backbone.train()
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        self.validation_accuracy = PairwiseAccuracy()

    # ------------------------------------------------------------------ scoring

    def render(self, prompt: Prompt, response: str) -> str:
        """Return the text of ``response`` following ``prompt``, as the backbone reads it."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        messages = [*messages, {"role": "assistant", "content": response}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return plain_conversation(messages)

    def forward(self, prompts: list[Prompt], responses: list[str]) -> Tensor:
        """Return the [B] scores of ``responses`` to ``prompts``, with a graph."""
        texts = [self.render(p, r) for p, r in zip(prompts, responses, strict=True)]
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.hparams.max_length,
            add_special_tokens=not self.tokenizer.chat_template,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.backbone(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
        ).last_hidden_state  # [B, T, D]
        pooled = pool(hidden, encoded["attention_mask"], self.hparams.pooling)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: list[Prompt], responses: list[str], batch_size: int = 16) -> Tensor:
        """Return the [B] scores on the CPU, in eval mode, ``batch_size`` sequences at a time."""
        was_training = self.training
        self.eval()
        try:
            scores = [
                self(prompts[start : start + batch_size], responses[start : start + batch_size])
                for start in range(0, len(prompts), batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(scores).float().cpu() if scores else torch.zeros(0)

    def pair_scores(self, pairs: list[PreferencePair]) -> tuple[Tensor, Tensor]:
        """Return the (chosen [P], rejected [P]) scores, computed in one forward pass."""
        prompts = [pair.prompt for pair in pairs] * 2
        responses = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
        return self(prompts, responses).chunk(2)

    # ------------------------------------------------------------------ Lightning

    def training_step(self, pairs: list[PreferencePair], batch_index: int) -> Tensor:
        chosen, rejected = self.pair_scores(pairs)
        loss = pairwise_loss(chosen, rejected)
        size = len(pairs)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/accuracy", (chosen > rejected).float().mean(), batch_size=size)
        return loss

    def validation_step(self, pairs: list[PreferencePair], batch_index: int) -> None:
        chosen, rejected = self.pair_scores(pairs)
        size = len(pairs)
        self.log("val/loss", pairwise_loss(chosen, rejected), batch_size=size, sync_dist=True)
        preferred = torch.zeros(2 * size, 2 * size, dtype=torch.bool, device=chosen.device)
        preferred[torch.arange(size), torch.arange(size) + size] = True
        self.validation_accuracy.update(torch.cat([chosen, rejected]), preferred)
        self.log("val/accuracy", self.validation_accuracy, prog_bar=True, batch_size=size)

    def export_artifact(self, directory: Path) -> None:
        """Write the backbone (adapter merged), the tokenizer, the head and the settings."""
        backbone = self.backbone
        if adapter_config(backbone) is not None:
            backbone = merge_adapter(copy.deepcopy(backbone))
        backbone.save_pretrained(str(directory / "backbone"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        save_file(
            {name: tensor.contiguous() for name, tensor in self.head.state_dict().items()},
            str(directory / "head.safetensors"),
        )
        settings = {
            "pooling": self.hparams.pooling,
            "max_length": self.hparams.max_length,
            "model": self.hparams.model,
        }
        (directory / "text_reward_model.json").write_text(json.dumps(settings, indent=2) + "\n")


def load_text_scorer(directory: str | Path, dtype: str = "float32") -> TextRewardModel:
    """Load an exported :class:`TextRewardModel` in eval mode, on the CPU.

    ``dtype`` is the backbone's parameter dtype (``"bfloat16"`` halves a large
    teacher's memory). The head stays in float32.
    """
    directory = Path(directory)
    settings_path = directory / "text_reward_model.json"
    if not settings_path.is_file():
        raise FileNotFoundError(
            f"{settings_path} not found; give the directory that TextRewardModel's export "
            "wrote (it contains backbone/, tokenizer/, head.safetensors and that file)."
        )
    settings = json.loads(settings_path.read_text())
    backbone = Backbone(
        pretrained=str(directory / "backbone"), tokenizer=str(directory / "tokenizer"), dtype=dtype
    )
    scorer = TextRewardModel(
        backbone, pooling=settings["pooling"], max_length=settings["max_length"]
    )
    scorer.head.load_state_dict(load_file(str(directory / "head.safetensors")))
    return scorer.eval()
