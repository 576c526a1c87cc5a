"""One helper that makes a backbone parameter-efficient, for every method.

``apply_adapter(model, adapter)`` takes a ``peft`` config or :class:`BitFit` and
returns the model with only the adapter's parameters trainable. The peft configs
include ``LoraConfig``, ``IA3Config``, ``PrefixTuningConfig``, ``PromptTuningConfig``,
``AdaLoraConfig``, ``LoHaConfig`` and ``LoKrConfig``, chosen by ``class_path`` in YAML.
``None`` returns the model unchanged, so modules call it unconditionally.

Two kinds of backbone are wrapped differently:

- a transformers ``PreTrainedModel`` (causal LM, encoder, CLIP) goes through
  ``peft.get_peft_model`` and comes back as a ``peft.PeftModel``, which forwards
  attribute access (``get_image_features``, ``config``) to the model it wraps;
- any other module, such as a diffusers ``UNet2DConditionModel``, gets the adapter
  layers injected in place (``peft.inject_adapter_in_model``) and keeps its class, so
  diffusers pipelines and schedulers use it as before.

Combinations the library cannot train are rejected here, before the first step, with
the reason: prompt and prefix tuning on a model that takes no ``inputs_embeds`` (they
feed virtual tokens as embeddings or as past key values of a text model), AdaLoRA on a
model that is not a transformers model (its rank allocator lives in ``PeftModel``), and
BitFit on a model without biases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Set by every peft config itself after construction, not by the user.
DERIVED_FIELDS = ("peft_type", "peft_version")


@dataclass
class BitFit:
    """Train only the bias terms (Ben Zaken et al., 2022, "BitFit").

    Args:
        include_norm: also train the weights of normalization layers (LayerNorm,
            RMSNorm, GroupNorm), which models without biases, such as Llama, need.
    """

    include_norm: bool = False


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    trainable = sum(
        parameter.numel() for parameter in model.parameters() if parameter.requires_grad
    )
    total = sum(parameter.numel() for parameter in model.parameters())
    return trainable, total


def describe_adapter(adapter: object | None) -> dict | None:
    """``adapter`` as a ``class_path``/``init_args`` mapping of plain values.

    Modules store this as their ``peft`` hyper-parameter: it loads with
    ``torch.load(weights_only=True)``, and LightningCLI parses it back into the same
    config when a fit resumes from a checkpoint. Arguments left at their defaults
    are omitted.
    """
    if adapter is None:
        return None
    if isinstance(adapter, BitFit):
        return {
            "class_path": "lightning_modules.adapters.BitFit",
            "init_args": {"include_norm": adapter.include_norm},
        }
    import peft

    adapter_type = type(adapter)
    if getattr(peft, adapter_type.__name__, None) is adapter_type:
        class_path = f"peft.{adapter_type.__name__}"
    else:
        class_path = f"{adapter_type.__module__}.{adapter_type.__qualname__}"
    init_args = {}
    for field in dataclasses.fields(adapter):
        value = getattr(adapter, field.name)
        if not field.init or field.name in DERIVED_FIELDS or value == _field_default(field):
            continue
        if isinstance(value, set):
            value = sorted(value)
        if isinstance(value, enum.Enum):  # PeftType and TaskType; unpicklable with weights_only
            value = value.value
        if not _is_plain(value):
            raise TypeError(
                f"{class_path}.{field.name}={value!r} cannot be stored in a checkpoint; "
                "give it as a plain value (string, number, list or mapping)."
            )
        init_args[field.name] = value
    return {"class_path": class_path, "init_args": init_args}


def adapter_from_description(description: dict) -> object:
    """Build the adapter config that :func:`describe_adapter` described.

    Modules call it through :func:`apply_adapter`, so ``load_from_checkpoint`` rebuilds
    the adapter from the stored hyper-parameters.
    """
    import importlib

    if set(description) != {"class_path", "init_args"}:
        raise ValueError(
            f"adapter description {description!r} must have exactly the keys class_path and "
            "init_args, as describe_adapter writes them."
        )
    module_name, _, class_name = description["class_path"].rpartition(".")
    adapter_type = getattr(importlib.import_module(module_name), class_name)
    return adapter_type(**description["init_args"])


def _field_default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _is_plain(value: object) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_plain(item) for key, item in value.items())
    return False


def _apply_bitfit(model: nn.Module, config: BitFit) -> nn.Module:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    trainable = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, norm_types) or "norm" in type(module).__name__.lower()
        for parameter_name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{parameter_name}" if module_name else parameter_name
            if parameter_name == "bias" or (config.include_norm and is_norm):
                trainable.add(full_name)
    if not trainable:
        raise ValueError(
            f"BitFit found no bias parameters in {type(model).__name__}; this model has "
            "bias-free layers. Use LoRA or IA3 instead, or BitFit(include_norm=True)."
        )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    return model


def _is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _check_supported(model: nn.Module, config: object) -> None:
    import peft

    name = type(model).__name__
    if isinstance(config, (peft.PrefixTuningConfig, peft.PromptTuningConfig)):
        method = type(config).__name__.removesuffix("Config")
        parameters = inspect.signature(model.forward).parameters
        if not _is_transformers_model(model) or "inputs_embeds" not in parameters:
            raise NotImplementedError(
                f"{method} is not supported for {name}: peft feeds the learned virtual tokens "
                "to a text model as input embeddings or past key values, and this model's "
                "forward() takes no inputs_embeds. Use LoRA, IA3, LoHa or LoKr for this backbone."
            )
        if config.task_type is None:
            raise ValueError(
                f"{type(config).__name__} needs task_type (CAUSAL_LM for a causal language "
                "model, FEATURE_EXTRACTION for an encoder), because peft builds a different "
                "wrapper for each."
            )
    if isinstance(config, peft.AdaLoraConfig) and not _is_transformers_model(model):
        raise NotImplementedError(
            f"AdaLoRA is not supported for {name}: its rank allocator runs inside a "
            "peft.PeftModel, which only wraps transformers models here. Use LoRA, LoHa or LoKr."
        )


def apply_adapter(model: nn.Module, adapter: object | None) -> nn.Module:
    """Wrap ``model`` with ``adapter`` (a peft config or :class:`BitFit`) and freeze the rest.

    Returns a ``peft.PeftModel`` for a transformers model with a peft config, and
    ``model`` itself otherwise (diffusers models get the adapter layers in place).
    ``adapter`` may also be the mapping that :func:`describe_adapter` returns.

    Raises:
        NotImplementedError: the adapter cannot be applied to this kind of model.
        ValueError: the adapter's configuration is incomplete for this model.
        TypeError: ``adapter`` is neither a peft config nor BitFit.
    """
    if adapter is None:
        return model
    if isinstance(adapter, dict):
        adapter = adapter_from_description(adapter)
    if isinstance(adapter, BitFit):
        return _apply_bitfit(model, adapter)

    import peft

    if not isinstance(adapter, peft.PeftConfig):
        raise TypeError(
            f"adapter must be a peft config (e.g. peft.LoraConfig) or BitFit, got {type(adapter).__name__}."
        )
    _check_supported(model, adapter)
    if _is_transformers_model(model):
        return peft.get_peft_model(model, adapter)
    model = peft.inject_adapter_in_model(adapter, model)
    model.peft_config = {"default": adapter}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_is_adapter_parameter(name))
    return model


def _is_adapter_parameter(name: str) -> bool:
    # peft names the tensors of its layers with these prefixes, e.g. "to_q.lora_A.default.weight".
    prefixes = ("lora_", "hada_", "lokr_", "ia3_")
    return any(part.startswith(prefixes) for part in name.split("."))


def adapter_config(model: nn.Module) -> object | None:
    """Return the peft config that :func:`apply_adapter` put on ``model``, or None."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    return configs["default"]


def has_switchable_adapter(model: nn.Module) -> bool:
    """Return True if ``model`` carries peft adapter layers that :func:`adapters_disabled` can switch off.

    BitFit trains the model's own biases and prompt-learning methods live in a
    ``PeftModel`` wrapper; neither has such layers.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model: every peft adapter layer is bypassed inside the block.

    This gives the frozen reference of DPO-style losses and of unlearning without a second
    copy of the model. Works for a ``PeftModel`` (transformers) and for adapters injected
    into a diffusers model; the layers' previous state is restored on exit.

    Raises:
        ValueError: ``model`` has no adapter layers to switch off.
    """
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, peft.PeftModel):
        with model.disable_adapter():
            yield model
        return
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no peft adapter layers to disable; keep a frozen "
            "copy of the model as the reference instead."
        )
    previous = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, previous, strict=True):
            layer.enable_adapters(not disabled)


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """Save only the adapter of ``model`` (``adapter_config.json`` + safetensors weights).

    A ``PeftModel`` is saved with its ``save_pretrained``; a model with injected layers
    is saved in the same two files, which :func:`load_adapter` reads back.
    """
    import peft
    from safetensors.torch import save_file

    directory = Path(directory)
    if isinstance(model, peft.PeftModel):
        model.save_pretrained(str(directory), safe_serialization=True)
        return
    config = adapter_config(model)
    if config is None:
        raise TypeError(
            f"{type(model).__name__} has no peft adapter to save; export the whole model instead."
        )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    state = peft.get_peft_model_state_dict(model)
    save_file(
        {key: value.contiguous() for key, value in state.items()}, directory / ADAPTER_WEIGHTS
    )


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` onto the base ``model`` (for inference)."""
    import peft
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{directory / ADAPTER_CONFIG} not found: {directory} is not an adapter directory "
            "(save_adapter writes adapter_config.json and adapter_model.safetensors)."
        )
    if _is_transformers_model(model):
        return peft.PeftModel.from_pretrained(model, str(directory))
    config = peft.PeftConfig.from_pretrained(str(directory))
    model = apply_adapter(model, config)
    result = peft.set_peft_model_state_dict(model, load_file(directory / ADAPTER_WEIGHTS))
    missing = [key for key in result.missing_keys if _is_adapter_parameter(key)]
    if missing:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS} lacks adapter weights: {missing[:3]}")
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Return the plain model with the adapter folded into its weights.

    ``model`` itself is modified; pass a copy to keep training it. LoRA, IA3, LoHa,
    LoKr and AdaLoRA merge; prompt and prefix tuning add inputs rather than weights
    and cannot. BitFit and no adapter return ``model`` unchanged.
    """
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, peft.PeftModel):
        if model.peft_config["default"].is_prompt_learning:
            raise NotImplementedError(
                f"{type(model.peft_config['default']).__name__} adds virtual tokens, not weight "
                "deltas, so it has no merged form; export the adapter instead."
            )
        return model.merge_and_unload()
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child_name, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def update_adapter_ranks(model: nn.Module, global_step: int) -> None:
    """Run AdaLoRA's rank reallocation after an optimizer step; other adapters need nothing.

    AdaLoRA reads the current gradients, so call this after ``optimizer.step()`` and
    before the gradients are cleared (Lightning's ``on_train_batch_end``).
    """
    import peft

    for module in model.modules():
        if isinstance(module, peft.AdaLoraModel):
            module.update_and_allocate(global_step)


def frozen_checksum(module: nn.Module) -> list[float]:
    """Sum and sum of squares (float64) of every frozen parameter: a cheap identity check."""
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    for parameter in module.parameters():
        if not parameter.requires_grad:
            values = parameter.detach().to(torch.float64)
            total += values.sum().cpu()
            squares += values.square().sum().cpu()
    return [total.item(), squares.item()]


def trainable_state_keys(module: nn.Module) -> tuple[set[str], set[str]]:
    """Return the ``state_dict`` keys of trainable and of frozen parameters.

    Tied parameters appear under every name the state dict uses for them.
    """
    by_identity = {
        id(parameter): parameter.requires_grad
        for _, parameter in module.named_parameters(remove_duplicate=False)
    }
    trainable, frozen = set(), set()
    for key, value in module.state_dict(keep_vars=True).items():
        if id(value) in by_identity:
            (trainable if by_identity[id(value)] else frozen).add(key)
    return trainable, frozen


def describe_keys(keys: set[str], limit: int = 3) -> str:
    listed = ", ".join(sorted(keys)[:limit])
    return listed + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
