"""Random-number-generator state in checkpoints, for exact resumption."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch


def collect_rng_state() -> dict[str, Any]:
    """Return the Python, NumPy and torch CPU generator states as checkpoint-safe values.

    NumPy's state is stored as a tensor plus integers, so that checkpoints still load
    with ``torch.load(weights_only=True)``.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states written by :func:`collect_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])


class RngStateCheckpoint(pl.Callback):
    """Save the generator states with each checkpoint and restore them on resume.

    The states are applied in ``on_train_start``, after the sanity-check validation,
    whose random draws would otherwise shift every later draw of the resumed run.
    NOTE: CUDA generators are not stored, so dropout masks on a GPU differ after a resume.

    Assumptions: every DataLoader has its own ``generator``. Creating a DataLoader
    iterator draws a worker seed, from the global generator by default. Lightning
    creates the first training iterator of a resumed run before ``on_train_start``, so
    without a private generator one draw is missing and the dropout masks shift.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None
