"""The PEFT helper on tiny transformers backbones: what trains, what stays, merge, export."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lightning_modules.adapters import BitFit, apply_adapter, count_parameters, save_adapter

TOKENS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    )


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return BertModel(config)


def causal_loss(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=TOKENS, labels=TOKENS).loss


DIRECTION = torch.randn(16, generator=torch.Generator().manual_seed(1))


def encoder_loss(model: torch.nn.Module) -> torch.Tensor:
    # A fixed projection, not the mean square: the final LayerNorm makes that nearly constant.
    output = model(input_ids=TOKENS, attention_mask=torch.ones_like(TOKENS))
    return (output.last_hidden_state @ DIRECTION).mean() + (output.pooler_output @ DIRECTION).mean()


BACKBONES = {
    "llama": (tiny_llama, causal_loss, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, causal_loss, "CAUSAL_LM"),
    "bert": (tiny_bert, encoder_loss, "FEATURE_EXTRACTION"),
}
ADAPTERS = {
    "lora": lambda task: peft.LoraConfig(r=4, target_modules="all-linear"),
    "ia3": lambda task: peft.IA3Config(task_type=task),
    "prompt": lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3),
    "prefix": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3),
    "bitfit": lambda task: BitFit(include_norm=True),
}


def _train(model: torch.nn.Module, loss_fn, steps: int = 3) -> None:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model).backward()
        optimizer.step()


@pytest.mark.parametrize("adapter_name", sorted(ADAPTERS))
@pytest.mark.parametrize("backbone_name", sorted(BACKBONES))
def test_adapter_trains_only_its_parameters(backbone_name: str, adapter_name: str) -> None:
    build, loss_fn, task = BACKBONES[backbone_name]
    model = build()
    before = {name: value.detach().clone() for name, value in model.named_parameters()}

    wrapped = apply_adapter(model, ADAPTERS[adapter_name](task))
    trainable, total = count_parameters(wrapped)
    assert 0 < trainable < total

    trainable_names = [name for name, value in wrapped.named_parameters() if value.requires_grad]
    start = {
        name: value.detach().clone()
        for name, value in wrapped.named_parameters()
        if value.requires_grad
    }
    _train(wrapped, loss_fn)

    changed = [
        name
        for name, value in wrapped.named_parameters()
        if name in start and not torch.equal(value, start[name])
    ]
    assert sorted(changed) == sorted(trainable_names)

    # The backbone's own parameters that are not trained are bit-identical. peft moves a
    # wrapped layer's weight under ".base_layer"; adapter parameters are not in ``before``.
    for name, value in model.named_parameters():
        original_name = name.replace(".base_layer", "")
        if not value.requires_grad and original_name in before:
            assert torch.equal(value, before[original_name]), name


def test_lora_merge_matches_adapter() -> None:
    model = apply_adapter(
        tiny_llama(), peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=TOKENS).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=TOKENS).logits
    # Merging adds B @ A into each weight, which changes float32 rounding only.
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_adapter_export_reloads(tmp_path: Path) -> None:
    base = tiny_llama()
    model = apply_adapter(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    _train(model, causal_loss)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=TOKENS).logits, model(input_ids=TOKENS).logits
        )


def test_bitfit_without_biases_rejected() -> None:
    with pytest.raises(ValueError, match="no bias parameters"):
        apply_adapter(tiny_llama(), BitFit())


def test_prefix_tuning_needs_past_key_values() -> None:
    class NoCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def forward(self, input_ids):
            return self.layer(input_ids)

    with pytest.raises(NotImplementedError, match="past_key_values"):
        apply_adapter(
            NoCache(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
        )


def test_prompt_tuning_needs_task_type() -> None:
    with pytest.raises(ValueError, match="needs task_type"):
        apply_adapter(tiny_bert(), peft.PromptTuningConfig(num_virtual_tokens=2))


def test_unknown_adapter_rejected() -> None:
    with pytest.raises(TypeError, match="peft config"):
        apply_adapter(tiny_bert(), {"r": 4})


def test_none_keeps_model() -> None:
    model = tiny_bert()
    assert apply_adapter(model, None) is model
    assert count_parameters(model)[0] == count_parameters(model)[1]
