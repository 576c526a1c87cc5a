"""Loading transformers backbones from a pretrained name, a local directory or a config."""

from lightning_modules.backbones.loading import (
    Backbone,
    load_model,
    load_tokenizer,
    resolve_location,
)

__all__ = ["Backbone", "load_model", "load_tokenizer", "resolve_location"]
