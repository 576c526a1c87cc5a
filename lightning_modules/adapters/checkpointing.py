"""Checkpoints that hold only what trains, for modules whose backbone may be frozen.

A LoRA fit of a 135M-parameter model trains under 1% of it. Saving the frozen 99% in
every ``.ckpt`` costs hundreds of megabytes per file and adds nothing, because the
module rebuilds the frozen weights from its backbone source when it is constructed:
the same pretrained files, or the same seeded random init. :class:`AdapterHooks`
therefore drops frozen parameters from the checkpoint's ``state_dict`` and records
a checksum of them instead. Loading checks that checksum against the freshly built
module, so resuming onto different base weights fails with an explanation instead of
silently training a different model. The adapter weights and the optimizer state come
back from the checkpoint; nothing is wrapped or initialized a second time.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_modules.adapters.wrapping import (
    count_parameters,
    describe_keys,
    frozen_checksum,
    trainable_state_keys,
    update_adapter_ranks,
)

CHECKSUM_KEY = "frozen_parameters_checksum"


def load_trainable_state(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Load a state dict that may lack frozen parameters; every trainable one must be there."""
    trainable, frozen = trainable_state_keys(module)
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing_trainable = set(missing) - frozen
    if missing_trainable or unexpected:
        raise KeyError(
            f"checkpoint does not match {type(module).__name__}: missing trainable "
            f"{describe_keys(missing_trainable) or 'none'}; unexpected "
            f"{describe_keys(set(unexpected)) or 'none'}. Build the module with the same "
            "backbone and peft settings as the run that wrote it."
        )


class AdapterHooks(pl.LightningModule):
    """LightningModule base for modules that may freeze part of their backbone.

    - Checkpoints keep trainable parameters and buffers only, plus a checksum of the
      frozen parameters that loading verifies. A module with nothing frozen saves
      and loads exactly as Lightning does by default.
    - AdaLoRA's rank reallocation runs after every optimizer step.
    - The start of fit prints the trainable and total parameter counts.
    - The default optimizer is AdamW over the trainable parameters, with the
      module's ``learning_rate`` and ``weight_decay`` hyper-parameters.

    Subclasses that override ``on_save_checkpoint``, ``on_load_checkpoint``,
    ``on_fit_start`` or ``on_train_batch_end`` call ``super()``.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _, frozen = trainable_state_keys(self)
        if not frozen:
            return
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if key not in frozen
        }
        checkpoint[CHECKSUM_KEY] = frozen_checksum(self)

    @property
    def strict_loading(self) -> bool:
        """False: Lightning must accept checkpoints without frozen weights.

        Lightning reads this before calling ``on_load_checkpoint``, so the keys are
        checked there instead, as strictly as ``strict=True`` would, except that the
        frozen parameters of a checkpoint with a checksum may be absent.
        """
        return False

    @strict_loading.setter
    def strict_loading(self, value: bool) -> None:
        raise AttributeError(
            f"{type(self).__name__} checks checkpoint keys in on_load_checkpoint; "
            "strict_loading cannot be changed."
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = set(checkpoint["state_dict"])
        expected = set(self.state_dict())
        required = expected
        if CHECKSUM_KEY in checkpoint:
            stored = checkpoint[CHECKSUM_KEY]
            found = frozen_checksum(self)
            if not all(
                math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
                for a, b in zip(stored, found, strict=True)
            ):
                raise ValueError(
                    "the frozen weights of this module differ from those the checkpoint was "
                    f"trained on (checksum {found} here, {stored} in the checkpoint). Build the "
                    "module from the same pretrained backbone, or with the same seed_everything "
                    "for a randomly initialized one, and the same peft settings."
                )
            _, frozen = trainable_state_keys(self)
            required = expected - frozen
        missing = required - saved
        if missing:
            raise KeyError(
                f"checkpoint lacks parameters {describe_keys(missing)}: it was written by a "
                "module with a different architecture or different peft settings."
            )
        unexpected = saved - expected
        if unexpected:
            raise KeyError(
                f"checkpoint has parameters this module does not: {describe_keys(unexpected)}. "
                "Build the module with the settings of the run that wrote it."
            )

    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self)
        self.print(
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = [parameter for parameter in self.parameters() if parameter.requires_grad]
        return torch.optim.AdamW(
            parameters, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        update_adapter_ranks(self, self.global_step)
