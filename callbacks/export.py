"""Export of each method's reusable artifact, written atomically.

A module that has a reusable artifact (a reward model, an adapter, an extractor)
implements :class:`Exportable`: ``export_artifact(directory)`` writes everything a user
needs to load it into ``directory``, which exists and is empty. :class:`ExportArtifact`
calls it at the end of fit and for the best checkpoint, through :func:`atomic_directory`,
so a process killed mid-export leaves either the previous complete artifact or none,
never a partial one.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
import torch

from callbacks.run_config import run_directory
from lightning_modules.adapters.checkpointing import load_trainable_state

log = logging.getLogger(__name__)


@runtime_checkable
class Exportable(Protocol):
    """A LightningModule with a reusable artifact."""

    def export_artifact(self, directory: Path) -> None:
        """Write the artifact's files into ``directory`` (which exists and is empty)."""


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    directory_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory that replaces ``target`` when the block succeeds.

    The staging directory is a sibling of ``target`` (same filesystem, so the final
    rename is atomic). If the block raises, the staging directory is removed and
    ``target`` is untouched. A previous ``target`` is first renamed to a backup, the
    staging directory takes its name, and then the backup is deleted. A crash between
    the two renames leaves no ``target`` and a complete backup, which the next call
    restores before doing anything else.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    backup = target.with_name(f".{target.name}.backup")

    if backup.exists() and not target.exists():
        backup.rename(target)
    for stale in target.parent.glob(f".{target.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(backup, ignore_errors=True)

    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    if target.exists():
        target.rename(backup)
    staging.rename(target)
    shutil.rmtree(backup, ignore_errors=True)


def export_module(module: Exportable, target: str | Path) -> Path:
    """Export ``module``'s artifact to ``target`` atomically and return the path."""
    with atomic_directory(target) as staging:
        module.export_artifact(staging)
    log.info("Exported %s to %s", type(module).__name__, target)
    return Path(target)


class ExportArtifact(pl.Callback):
    """Write the module's artifact at the end of fit, for the last and the best weights.

    Args:
        dirpath: where to write; defaults to ``<run directory>/export``, beside ``checkpoints/``.
            Two directories are written there: ``last`` (weights at the end of fit) and
            ``best`` (weights of the best checkpoint of the first ``ModelCheckpoint`` that
            monitors a metric), when such a checkpoint exists.
        export_best: also export the best checkpoint's weights.
    """

    def __init__(self, dirpath: str | None = None, export_best: bool = True):
        self.dirpath = dirpath
        self.export_best = export_best

    def _root(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return run_directory(trainer) / "export"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, Exportable):
            raise TypeError(
                f"ExportArtifact needs a module with export_artifact(directory); "
                f"{type(pl_module).__name__} has none. Remove the callback or implement the method."
            )

    # NOTE: only global rank 0 reads the module's state_dict. That is complete under DDP;
    # under FSDP the parameters are sharded and this export has not been run.
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank reaches this hook; only global rank 0 writes.
        if not trainer.is_global_zero:
            return
        root = self._root(trainer)
        export_module(pl_module, root / "last")

        best_path = self._best_checkpoint(trainer)
        if not self.export_best or best_path is None:
            return
        current_state = {
            name: tensor.detach().clone() for name, tensor in pl_module.state_dict().items()
        }
        checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
        # Checkpoints of adapter fits hold the trainable parameters only.
        load_trainable_state(pl_module, checkpoint["state_dict"])
        try:
            export_module(pl_module, root / "best")
        finally:
            pl_module.load_state_dict(current_state)

    @staticmethod
    def _best_checkpoint(trainer: pl.Trainer) -> str | None:
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "monitor", None) and getattr(callback, "best_model_path", ""):
                return callback.best_model_path
        return None
