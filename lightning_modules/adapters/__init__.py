"""Parameter-efficient fine-tuning of any backbone: peft adapters and BitFit."""

from lightning_modules.adapters.wrapping import (
    BitFit,
    apply_adapter,
    count_parameters,
    save_adapter,
)

__all__ = ["BitFit", "apply_adapter", "count_parameters", "save_adapter"]
