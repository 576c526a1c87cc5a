"""Unlearning: each objective on a tiny model against its formula, the frozen reference,
gradient ascent raising the forget NLL, and the forget/retain data stream on TOFU."""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch

from datamodules.prompt_response import PromptResponse
from datamodules.unlearning import UnlearningDataModule, read_refusals
from lightning_modules.backbones import Backbone
from lightning_modules.causal_lm import response_token_loss
from lightning_modules.unlearning import Unlearning
from tests.test_causal_lm import MINILM_TOKENIZER, TINY_LLAMA

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
LORA = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])


def records(*pairs: tuple[str, str]) -> list[PromptResponse]:
    return [PromptResponse(prompt, response, "test") for prompt, response in pairs]


BATCH = {
    "forget": records(("Who wrote Night Tide?", "Ayla Moreno wrote it.")),
    "retain": records(("What is two plus two?", "Four."), ("Capital of France?", "Paris.")),
    "refusal": records(("Who wrote Night Tide?", "I don't know.")),
}


def tiny_unlearning(**overrides) -> Unlearning:
    torch.manual_seed(0)
    model = Backbone(config=dict(TINY_LLAMA), tokenizer=MINILM_TOKENIZER)
    return Unlearning(model, max_length=32, **overrides)


def fine_tuning_loss(module: Unlearning, items: list[PromptResponse]) -> float:
    batch = module.featurize(items)
    with torch.no_grad():
        return response_token_loss(module.token_logits(batch), batch.labels).item()


@pytest.mark.parametrize("objective", ["ga", "grad_diff", "npo", "po"])
def test_objective_matches_formula(objective: str) -> None:
    module = tiny_unlearning(objective=objective, gamma=0.5, beta=0.2, peft=LORA).eval()
    with torch.no_grad():
        loss, _ = module.unlearning_loss(BATCH)
    forget = fine_tuning_loss(module, BATCH["forget"])
    retain = fine_tuning_loss(module, BATCH["retain"])
    refusal = fine_tuning_loss(module, BATCH["refusal"])
    expected = {
        "ga": -forget,
        "grad_diff": -forget + 0.5 * retain,
        # Before training pi = pi_ref, so each softplus is log 2: (2 / 0.2) log 2.
        "npo": 2 / 0.2 * math.log(2) + 0.5 * retain,
        "po": refusal + 0.5 * retain,
    }[objective]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_retain_kl_zero_then_positive() -> None:
    module = tiny_unlearning(objective="ga", kl_weight=1.0, peft=LORA).eval()
    with torch.no_grad():
        _, terms = module.unlearning_loss(BATCH)
        assert terms["retain_kl"].item() == pytest.approx(0.0, abs=1e-6)
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
        _, terms = module.unlearning_loss(BATCH)
    assert terms["retain_kl"].item() > 1e-4


def _train(module: Unlearning, steps: int) -> None:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        module.unlearning_loss(BATCH)[0].backward()
        optimizer.step()


def test_gradient_ascent_raises_forget_nll() -> None:
    module = tiny_unlearning(objective="ga")
    before = fine_tuning_loss(module, BATCH["forget"])
    _train(module, 5)
    after = fine_tuning_loss(module, BATCH["forget"])
    assert after > before + 0.1


@pytest.mark.parametrize("adapter", [None, LORA], ids=["full", "lora"])
def test_npo_reference_stays_the_starting_model(adapter) -> None:
    module = tiny_unlearning(objective="npo", peft=adapter)
    assert (module.reference_model is None) == (adapter is not None)
    batch = module.featurize(BATCH["forget"])
    start = module.reference_logits(batch).clone()
    _train(module, 3)
    with torch.no_grad():
        moved = module.token_logits(batch)
    assert not torch.allclose(moved, start, atol=1e-4)  # the policy trained
    torch.testing.assert_close(module.reference_logits(batch), start)
    if module.reference_model is not None:
        assert not any(p.requires_grad for p in module.reference_model.parameters())


def test_po_without_refusals_is_rejected() -> None:
    module = tiny_unlearning(objective="po")
    with pytest.raises(ValueError, match="refusal_file"):
        module.unlearning_loss({key: BATCH[key] for key in ("forget", "retain")})


def test_invalid_objective_rejected() -> None:
    with pytest.raises(ValueError, match="objective='sgd'"):
        tiny_unlearning(objective="sgd")


@pytest.mark.skipif(not TOFU_DIR.is_dir(), reason=f"TOFU data not found at {TOFU_DIR}")
def test_tofu_stream_pairs_forget_retain_and_refusals() -> None:
    data = UnlearningDataModule(
        forget_file=str(TOFU_DIR / "forget01.json"),
        retain_file=str(TOFU_DIR / "retain90.json"),
        refusal_file=str(TOFU_DIR / "idontknow.jsonl"),
        batch_size=8,
        retain_batch_size=4,
    )
    data.setup("fit")
    assert len(data.forget) == 40
    assert len(data.retain) == 3600
    loader = data.train_dataloader()
    iterator = iter(loader)
    batches = []
    for _ in range(len(data.forget) // 8):
        batch, _, _ = next(iterator)
        batches.append(batch)
    # One epoch is one pass over the 40 forget records.
    forget_prompts = [r.prompt for batch in batches for r in batch["forget"]]
    assert sorted(forget_prompts) == sorted(r.prompt for r in data.forget)
    refusals = set(read_refusals(TOFU_DIR / "idontknow.jsonl"))
    for batch in batches:
        assert len(batch["retain"]) == 4
        assert [r.prompt for r in batch["refusal"]] == [r.prompt for r in batch["forget"]]
        assert all(r.response in refusals for r in batch["refusal"])
