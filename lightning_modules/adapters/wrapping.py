"""One helper that makes a backbone parameter-efficient, for every method.

``apply_adapter(model, adapter)`` takes a ``peft`` config or :class:`BitFit` and
returns the model with only the adapter's parameters trainable. The peft configs
include ``LoraConfig``, ``IA3Config``, ``PrefixTuningConfig``, ``PromptTuningConfig``,
``AdaLoraConfig``, ``LoHaConfig`` and ``LoKrConfig``, chosen by ``class_path`` in YAML.
``None`` returns the model unchanged, so modules call it unconditionally.

Combinations the library cannot train are rejected here, before the first step, with
the reason. Prefix tuning feeds its learned prefixes to the model as past key values,
so it needs a model whose ``forward`` takes ``past_key_values``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass
class BitFit:
    """Train only the bias terms (Ben Zaken et al., 2022, "BitFit").

    Args:
        include_norm: also train the weights of normalization layers (LayerNorm, RMSNorm).
    """

    include_norm: bool = False


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    trainable = sum(
        parameter.numel() for parameter in model.parameters() if parameter.requires_grad
    )
    total = sum(parameter.numel() for parameter in model.parameters())
    return trainable, total


def _apply_bitfit(model: nn.Module, config: BitFit) -> nn.Module:
    norm_types = tuple(
        module_type
        for module_type in (nn.LayerNorm, getattr(nn, "RMSNorm", None))
        if module_type is not None
    )
    trainable = set()
    for module_name, module in model.named_modules():
        for parameter_name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{parameter_name}" if module_name else parameter_name
            is_norm = isinstance(module, norm_types) or "norm" in type(module).__name__.lower()
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


def _check_supported(model: nn.Module, config: object) -> None:
    import peft

    if isinstance(config, peft.PrefixTuningConfig):
        parameters = inspect.signature(model.forward).parameters
        if "past_key_values" not in parameters and "kwargs" not in parameters:
            raise NotImplementedError(
                f"prefix tuning is not supported for {type(model).__name__}: its forward() takes "
                "no past_key_values, which is how peft passes the learned prefixes. Use LoRA, "
                "IA3 or prompt tuning for this backbone."
            )
    if (
        isinstance(config, (peft.PrefixTuningConfig, peft.PromptTuningConfig))
        and config.task_type is None
    ):
        raise ValueError(
            f"{type(config).__name__} needs task_type (CAUSAL_LM for a causal language model, "
            "FEATURE_EXTRACTION for an encoder), because peft builds a different wrapper for each."
        )


def apply_adapter(model: nn.Module, adapter: object | None) -> nn.Module:
    """Wrap ``model`` with ``adapter`` (a peft config or :class:`BitFit`) and freeze the rest.

    Returns the wrapped model: a ``peft.PeftModel`` for peft configs, ``model`` itself
    for BitFit and for ``None``.

    Raises:
        NotImplementedError: the adapter cannot be applied to this kind of model.
        TypeError: ``adapter`` is neither a peft config nor BitFit.
    """
    if adapter is None:
        return model
    if isinstance(adapter, BitFit):
        return _apply_bitfit(model, adapter)

    import peft

    if not isinstance(adapter, peft.PeftConfig):
        raise TypeError(
            f"adapter must be a peft config (e.g. peft.LoraConfig) or BitFit, got {type(adapter).__name__}."
        )
    _check_supported(model, adapter)
    return peft.get_peft_model(model, adapter)


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """Save only the adapter of a peft-wrapped ``model`` (``save_pretrained``, safetensors)."""
    import peft

    if not isinstance(model, peft.PeftModel):
        raise TypeError(
            f"{type(model).__name__} has no peft adapter to save; export the whole model instead."
        )
    model.save_pretrained(str(directory), safe_serialization=True)
