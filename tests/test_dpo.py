"""DPO: the losses against hand-computed values, sequence log-probabilities that mask the
prompt and the padding, the frozen reference, precomputed reference scores, and the
preference-pair readers on HH-RLHF's tricky records."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import peft
import pytest
import torch

from datamodules.jsonl import DataValidationError
from datamodules.text_preference import (
    PreferencePair,
    TextPreferenceDataModule,
    held_out_split,
    read_preference_pairs,
    split_hh_rlhf,
    transcript_messages,
)
from lightning_modules.backbones import Backbone
from lightning_modules.dpo import DPO
from lightning_modules.losses.preference import hinge_loss, ipo_loss, sigmoid_loss
from tests.conftest import fit_quietly
from tests.test_causal_lm import MINILM_TOKENIZER, TINY_LLAMA

HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf"
HH_TEST = HH_RLHF / "harmless-base_test.jsonl.gz"
LORA = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
PAIRS = [
    PreferencePair("Who wrote Night Tide?", "Ayla Moreno wrote it.", "No idea.", "t:1"),
    PreferencePair(
        [
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a long river in Africa, please."},
        ],
        "The Nile.",
        "I would rather not say anything about rivers today.",
        "t:2",
    ),
]


def tiny_dpo(**overrides) -> DPO:
    torch.manual_seed(0)
    return DPO(Backbone(config=dict(TINY_LLAMA), tokenizer=MINILM_TOKENIZER), **overrides)


def test_losses_against_hand_computed_values() -> None:
    chosen, rejected = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])

    # beta = 0.5: margins beta * h = 0.5 and 1.0. log sigmoid(z) = -log(1 + e^-z).
    def log_sigmoid(z: float) -> float:
        return -math.log(1 + math.exp(-z))

    expected = [-(0.9 * log_sigmoid(z) + 0.1 * log_sigmoid(-z)) for z in (0.5, 1.0)]
    torch.testing.assert_close(sigmoid_loss(chosen, rejected, 0.5, 0.1), torch.tensor(expected))
    # IPO: (h - 1 / (2 * 0.5))^2 = (1 - 1)^2 and (2 - 1)^2.
    torch.testing.assert_close(ipo_loss(chosen, rejected, 0.5, 0.0), torch.tensor([0.0, 1.0]))
    # Hinge: max(0, 1 - 0.5 h) = 0.5 and 0.
    torch.testing.assert_close(hinge_loss(chosen, rejected, 0.5, 0.0), torch.tensor([0.5, 0.0]))


def manual_log_prob(module: DPO, prompt, response: str) -> float:
    """Sum of log p(response token) with the unpadded sequence, computed directly."""
    prompt_ids = module.prompt_ids(prompt)
    response_ids = module.tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids + [module.end_token_id]])
    with torch.no_grad():
        log_probs = module.model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(
        log_probs[position - 1, ids[0, position]].item()
        for position in range(len(prompt_ids), ids.shape[1])
    )


def test_log_probs_mask_prompt_and_padding() -> None:
    module = tiny_dpo().eval()
    with torch.no_grad():
        chosen, rejected = module.policy_log_probs(module.pair_tokens(PAIRS))
    for index, pair in enumerate(PAIRS):
        assert chosen[index].item() == pytest.approx(
            manual_log_prob(module, pair.prompt, pair.chosen), rel=1e-5
        )
        assert rejected[index].item() == pytest.approx(
            manual_log_prob(module, pair.prompt, pair.rejected), rel=1e-5
        )
    # IPO uses the mean over response tokens.
    module.hparams.loss = "ipo"
    with torch.no_grad():
        mean_chosen, _ = module.policy_log_probs(module.pair_tokens(PAIRS[:1]))
    tokens = len(module.tokenizer(PAIRS[0].chosen, add_special_tokens=False)["input_ids"]) + 1
    assert mean_chosen.item() == pytest.approx(chosen[0].item() / tokens, rel=1e-5)


@pytest.mark.parametrize("adapter", [None, LORA], ids=["full", "lora"])
def test_reference_stays_frozen_while_the_margin_grows(adapter) -> None:
    module = tiny_dpo(peft=adapter, beta=0.5)
    with torch.no_grad():
        loss, diagnostics = module.preference_loss(PAIRS)
    # pi = pi_ref at the start: every log-ratio is 0 and the loss is log 2.
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert diagnostics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)
    reference_before = module.reference_log_probs(PAIRS)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(10):
        loss, _ = module.preference_loss(PAIRS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        loss, diagnostics = module.preference_loss(PAIRS)
    reference_after = module.reference_log_probs(PAIRS)
    for before, after in zip(reference_before, reference_after, strict=True):
        torch.testing.assert_close(before, after)
    assert loss.item() < math.log(2) - 0.1
    assert diagnostics["rewards/margins"].item() > 0.2
    assert diagnostics["rewards/accuracies"].item() == 1.0
    if adapter is None:
        assert not any(p.requires_grad for p in module.reference_model.parameters())


def test_precomputed_reference_matches_and_is_used(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
            for p in PAIRS * 3
        )
        + "\n"
    )
    data = TextPreferenceDataModule(str(path), val_size=2, batch_size=2)
    module = tiny_dpo(peft=LORA, precompute_reference=True)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # the policy now differs from the reference
    expected = {}
    data.setup("fit")
    for pair in data.splits["train"] + data.splits["val"]:
        chosen, rejected = module.reference_log_probs([pair])
        expected[pair.location] = (chosen.item(), rejected.item())
        with torch.no_grad():
            policy_chosen, _ = module.policy_log_probs(module.pair_tokens([pair]))
        assert abs(policy_chosen.item() - chosen.item()) > 1e-3
    fit_quietly(module, data, tmp_path, max_epochs=1, store_rng=False)
    assert module.reference_cache.keys() == expected.keys()
    for location, values in expected.items():
        assert module.reference_cache[location] == pytest.approx(values, rel=1e-5)
    # Cached values are returned without a forward pass: changing one shows in the result.
    pair = data.splits["train"][0]
    module.reference_cache[pair.location] = (1.0, 2.0)
    assert [t.item() for t in module.reference_log_probs([pair])] == [1.0, 2.0]


def test_dpo_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="loss='kto'"):
        tiny_dpo(loss="kto")
    with pytest.raises(ValueError, match="label_smoothing=0.7"):
        tiny_dpo(label_smoothing=0.7)


# ---------------------------------------------------------------- reading pairs


def test_hh_rlhf_split_and_messages() -> None:
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help me?\n\nAssistant: Sure."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help me?\n\nAssistant: Surely not."
    messages, chosen_turn, rejected_turn = split_hh_rlhf(chosen, rejected)
    assert messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Help me?"},
    ]
    assert (chosen_turn, rejected_turn) == ("Sure.", "Surely not.")
    # One side's final turn runs on with more turns: the split is where the two part.
    longer = chosen + "\n\nHuman: Thanks\n\nAssistant: Welcome."
    messages, chosen_turn, rejected_turn = split_hh_rlhf(longer, rejected)
    assert len(messages) == 3
    assert chosen_turn == "Sure.\n\nHuman: Thanks\n\nAssistant: Welcome."
    with pytest.raises(ValueError, match="turn marker"):
        transcript_messages("Hi\n\nAssistant: Hello")
    # Two human turns in a row become one message, so the roles alternate.
    assert transcript_messages("\n\nHuman: a\n\nHuman: b\n\nAssistant: c") == [
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "c"},
    ]


@pytest.mark.skipif(not HH_TEST.is_file(), reason=f"HH-RLHF not found at {HH_TEST}")
def test_hh_rlhf_file_tricky_records(caplog: pytest.LogCaptureFixture) -> None:
    pairs = read_preference_pairs(HH_TEST, "hh_rlhf")
    # 2,312 pairs, of which 4 have an empty final turn (lines 87, 517, 926, 1104).
    assert len(pairs) == 2308
    assert "lines 87, 517, 926, 1104" in caplog.text
    by_line = {int(pair.location.rsplit(":", 1)[1]): pair for pair in pairs}
    # Line 1255: the chosen transcript has one more exchange than the rejected one.
    pair = by_line[1255]
    assert pair.prompt[-1] == {"role": "user", "content": "Isn't that drag kings?"}
    assert pair.chosen.startswith("No. Men who impersonate")
    assert pair.rejected.startswith("A drag king is the opposite")
    assert sum(len(pair.prompt) == 1 for pair in pairs) == 659


def test_invalid_pairs_are_named(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(DataValidationError, match=r"pairs\.jsonl:1: field 'rejected'"):
        read_preference_pairs(path)
    gz = tmp_path / "hh.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.write(json.dumps({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}) + "\n")
    with pytest.raises(DataValidationError, match=r"hh\.jsonl\.gz:1: .*no .*Assistant"):
        read_preference_pairs(gz, "hh_rlhf")


def test_held_out_split_is_seeded_and_disjoint() -> None:
    train, val = held_out_split(10, 3, seed=4)
    assert len(val) == 3 and sorted(train + val) == list(range(10))
    assert held_out_split(10, 3, seed=4) == (train, val)
    assert held_out_split(10, 3, seed=5) != (train, val)
    with pytest.raises(ValueError, match="val_size=10"):
        held_out_split(10, 10, seed=0)
