"""The PEFT helper on tiny backbones of each kind: what trains, what stays, merge, export.

Backbone kinds: a transformers causal LM (Llama), a transformers encoder (BERT), CLIP,
and a diffusers UNet2DConditionModel.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lightning_modules.adapters import (
    BitFit,
    adapter_from_description,
    adapters_disabled,
    apply_adapter,
    count_parameters,
    describe_adapter,
    has_switchable_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    update_adapter_ranks,
)

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


def tiny_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **layers,
            "vocab_size": 64,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
        },
        vision_config={**layers, "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        projection_dim=16,
    )
    return CLIPModel(config)


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )


def causal_loss(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=TOKENS, labels=TOKENS).loss


DIRECTION = torch.randn(16, generator=torch.Generator().manual_seed(1))
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
TEXT_STATES = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
NOISE_TARGET = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))


def encoder_loss(model: torch.nn.Module) -> torch.Tensor:
    # A fixed projection, not the mean square: the final LayerNorm makes that nearly constant.
    output = model(input_ids=TOKENS, attention_mask=torch.ones_like(TOKENS))
    return (output.last_hidden_state @ DIRECTION).mean() + (output.pooler_output @ DIRECTION).mean()


def clip_loss(model: torch.nn.Module) -> torch.Tensor:
    output = model(input_ids=TOKENS[:, :5], pixel_values=PIXELS)
    return (output.text_embeds @ DIRECTION).mean() + (output.image_embeds @ DIRECTION).mean()


def unet_loss(model: torch.nn.Module) -> torch.Tensor:
    timesteps = torch.tensor([10, 500])
    sample = model(LATENTS, timesteps, encoder_hidden_states=TEXT_STATES).sample
    return (sample - NOISE_TARGET).square().mean()


def clip_output(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=TOKENS[:, :5], pixel_values=PIXELS).logits_per_image


def unet_output(model: torch.nn.Module) -> torch.Tensor:
    return model(LATENTS, torch.tensor([10, 500]), encoder_hidden_states=TEXT_STATES).sample


def llama_output(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=TOKENS).logits


# name: (builder, loss, peft task type, attention projections, IA3 targets, IA3 feed-forward)
BACKBONES = {
    "llama": (tiny_llama, causal_loss, "CAUSAL_LM", ["q_proj", "v_proj"], None, None),
    "bert": (tiny_bert, encoder_loss, "FEATURE_EXTRACTION", ["query", "value"], None, None),
    "clip": (
        tiny_clip,
        clip_loss,
        None,
        ["q_proj", "v_proj"],
        ["k_proj", "v_proj", "fc2"],
        ["fc2"],
    ),
    "unet": (
        tiny_unet,
        unet_loss,
        None,
        ["to_q", "to_k", "to_v", "to_out.0"],
        ["to_k", "to_v", "ff.net.2"],
        ["ff.net.2"],
    ),
}


def make_adapter(name: str, backbone: str) -> object:
    _, _, task, projections, ia3_targets, ia3_feedforward = BACKBONES[backbone]
    if name == "lora":
        return peft.LoraConfig(r=4, target_modules=projections)
    if name == "ia3":
        if ia3_targets is None:  # peft has default IA3 layers for Llama and BERT
            return peft.IA3Config(task_type=task)
        return peft.IA3Config(target_modules=ia3_targets, feedforward_modules=ia3_feedforward)
    if name == "adalora":
        # AdaLoRA starts with singular values E = 0, so A and B get gradients from the
        # second step on; tinit keeps the rank budget fixed over the few test steps.
        return peft.AdaLoraConfig(
            init_r=4, target_r=2, target_modules=projections, total_step=20, tinit=10
        )
    if name == "loha":
        return peft.LoHaConfig(r=2, target_modules=projections)
    if name == "lokr":
        return peft.LoKrConfig(r=2, target_modules=projections)
    if name == "prompt":
        return peft.PromptTuningConfig(task_type=task or "FEATURE_EXTRACTION", num_virtual_tokens=3)
    if name == "prefix":
        return peft.PrefixTuningConfig(task_type=task or "FEATURE_EXTRACTION", num_virtual_tokens=3)
    if name == "bitfit":
        return BitFit(include_norm=True)
    raise KeyError(name)


ADAPTERS = ["lora", "ia3", "adalora", "loha", "lokr", "prompt", "prefix", "bitfit"]
# Backbone and method pairs that apply_adapter rejects before training, with the reason.
REJECTED = {
    ("clip", "prompt"): "inputs_embeds",
    ("clip", "prefix"): "inputs_embeds",
    ("unet", "prompt"): "inputs_embeds",
    ("unet", "prefix"): "inputs_embeds",
    ("unet", "adalora"): "rank allocator",
}


def _train(model: torch.nn.Module, loss_fn, steps: int = 3) -> None:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # Adam, because its step size does not shrink with the gradient: AdaLoRA's A and B
    # get gradients near 1e-11 on the query projection of the tiny BERT.
    optimizer = torch.optim.Adam(parameters, lr=0.05)
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(model).backward()
        optimizer.step()
        update_adapter_ranks(model, step)


@pytest.mark.parametrize("adapter_name", ADAPTERS)
@pytest.mark.parametrize("backbone_name", sorted(BACKBONES))
def test_adapter_trains_only_its_parameters(backbone_name: str, adapter_name: str) -> None:
    build, loss_fn, *_ = BACKBONES[backbone_name]
    model = build()
    adapter = make_adapter(adapter_name, backbone_name)
    if (backbone_name, adapter_name) in REJECTED:
        with pytest.raises(NotImplementedError, match=REJECTED[backbone_name, adapter_name]):
            apply_adapter(model, adapter)
        return
    before = {name: value.detach().clone() for name, value in model.named_parameters()}

    wrapped = apply_adapter(model, adapter)
    trainable, total = count_parameters(wrapped)
    assert 0 < trainable < total
    if backbone_name == "unet" and adapter_name != "bitfit":
        # Injected in place: diffusers code keeps working with the same class.
        assert type(wrapped) is UNet2DConditionModel

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


OUTPUTS = {"llama": llama_output, "clip": clip_output, "unet": unet_output}


@pytest.mark.parametrize(
    ("backbone_name", "adapter_name"),
    [("llama", "lora"), ("llama", "ia3"), ("clip", "lora"), ("unet", "lora"), ("unet", "lokr")],
)
def test_merged_model_matches_adapter(backbone_name: str, adapter_name: str) -> None:
    build, loss_fn, *_ = BACKBONES[backbone_name]
    model = apply_adapter(build(), make_adapter(adapter_name, backbone_name))
    _train(model, loss_fn)  # LoRA starts as the identity; train so the delta is not zero
    model.eval()
    output = OUTPUTS[backbone_name]
    with torch.no_grad():
        unmerged = output(model)
        merged_model = merge_adapter(copy.deepcopy(model))
        merged = output(merged_model)
    assert count_parameters(merged_model)[1] == count_parameters(build())[1]
    assert not any(".base_layer" in name for name, _ in merged_model.named_parameters())
    assert not torch.allclose(unmerged, output(build().eval()), atol=1e-4)
    # Merging folds the delta into each weight, which changes float32 rounding only.
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_prompt_tuning_has_no_merged_form() -> None:
    model = apply_adapter(tiny_llama(), make_adapter("prompt", "llama"))
    with pytest.raises(NotImplementedError, match="no merged form"):
        merge_adapter(model)


@pytest.mark.parametrize("backbone_name", ["llama", "unet"])
def test_adapter_export_reloads(tmp_path: Path, backbone_name: str) -> None:
    build, loss_fn, *_ = BACKBONES[backbone_name]
    model = apply_adapter(build(), make_adapter("lora", backbone_name))
    _train(model, loss_fn)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = load_adapter(build(), tmp_path / "adapter").eval()
    model.eval()
    output = OUTPUTS[backbone_name]
    with torch.no_grad():
        assert torch.equal(output(reloaded), output(model))
        assert not torch.allclose(output(build().eval()), output(model), atol=1e-4)


def test_load_adapter_names_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_unet(), tmp_path)


def test_bitfit_without_biases_rejected() -> None:
    with pytest.raises(ValueError, match="no bias parameters"):
        apply_adapter(tiny_llama(), BitFit())


def test_prefix_tuning_needs_a_text_model() -> None:
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def forward(self, input_ids):
            return self.layer(input_ids)

    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        apply_adapter(Plain(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


def test_prompt_tuning_needs_task_type() -> None:
    with pytest.raises(ValueError, match="needs task_type"):
        apply_adapter(tiny_bert(), peft.PromptTuningConfig(num_virtual_tokens=2))


def test_unknown_adapter_rejected() -> None:
    with pytest.raises(TypeError, match="peft config"):
        apply_adapter(tiny_bert(), "lora")
    with pytest.raises(ValueError, match="class_path and init_args"):
        apply_adapter(tiny_bert(), {"r": 4})


@pytest.mark.parametrize("adapter_name", ["lora", "prompt", "bitfit"])
def test_adapter_description_round_trip(adapter_name: str) -> None:
    adapter = make_adapter(adapter_name, "llama")
    description = describe_adapter(adapter)
    assert set(description) == {"class_path", "init_args"}
    rebuilt = adapter_from_description(description)
    assert type(rebuilt) is type(adapter)
    assert describe_adapter(rebuilt) == description
    # The stored description is enough to wrap a model the same way.
    wrapped = apply_adapter(tiny_llama(), description)
    original = apply_adapter(tiny_llama(), adapter)
    assert sorted(name for name, p in wrapped.named_parameters() if p.requires_grad) == sorted(
        name for name, p in original.named_parameters() if p.requires_grad
    )


def test_none_keeps_model() -> None:
    model = tiny_bert()
    assert apply_adapter(model, None) is model
    assert count_parameters(model)[0] == count_parameters(model)[1]


@pytest.mark.parametrize("adapter_name", ["lora", "prompt"])
def test_adapters_disabled_gives_base_outputs(adapter_name: str) -> None:
    model = apply_adapter(tiny_llama(), make_adapter(adapter_name, "llama"))
    _train(model, causal_loss)  # move the adapter away from the identity
    model.eval()
    with torch.no_grad():
        adapted = llama_output(model)
        with adapters_disabled(model):
            disabled = llama_output(model)
        again = llama_output(model)
        base = llama_output(tiny_llama().eval())
    # Prompt tuning prepends virtual tokens, so compare the positions of the real tokens.
    width = TOKENS.shape[1]
    torch.testing.assert_close(disabled[:, -width:], base)
    assert not torch.allclose(adapted[:, -width:], base, atol=1e-4)
    torch.testing.assert_close(again, adapted)


def test_adapters_disabled_needs_adapter_layers() -> None:
    assert not has_switchable_adapter(apply_adapter(tiny_unet(), BitFit()))
    with pytest.raises(ValueError, match="no peft adapter layers"):
        with adapters_disabled(tiny_unet()):
            pass
