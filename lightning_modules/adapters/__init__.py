"""Parameter-efficient fine-tuning of any backbone: peft adapters and BitFit."""

from lightning_modules.adapters.checkpointing import AdapterHooks, load_trainable_state
from lightning_modules.adapters.wrapping import (
    BitFit,
    adapter_config,
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

__all__ = [
    "AdapterHooks",
    "BitFit",
    "adapter_config",
    "adapter_from_description",
    "adapters_disabled",
    "apply_adapter",
    "count_parameters",
    "describe_adapter",
    "has_switchable_adapter",
    "load_adapter",
    "load_trainable_state",
    "merge_adapter",
    "save_adapter",
    "update_adapter_ranks",
]
