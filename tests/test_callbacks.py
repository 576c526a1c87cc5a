"""Export atomicity, the non-finite-loss guard, RNG state and W&B media helpers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from callbacks.export import atomic_directory, export_module
from callbacks.guards import NonFiniteLossError, NonFiniteLossGuard
from callbacks.media import log_image_grid, log_table
from callbacks.rng import collect_rng_state, restore_rng_state
from tests.conftest import REPO_ROOT

# A child process that exports an artifact of two files and hangs after writing the
# first one, printing READY when the parent should kill it.
SLOW_EXPORT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from callbacks.export import export_module

    class SlowArtifact:
        def export_artifact(self, directory: Path) -> None:
            (directory / "weights.bin").write_bytes(b"new" * 1000)
            print("READY", flush=True)
            time.sleep(600)
            (directory / "config.json").write_text("{}")

    export_module(SlowArtifact(), sys.argv[1])
    """
)


class TwoFiles:
    def export_artifact(self, directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"old")
        (directory / "config.json").write_text('{"version": 1}')


def _kill_mid_export(target: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXPORT, str(target)],
        stdout=subprocess.PIPE,
        text=True,
        env=environment,
    )
    assert child.stdout.readline().strip() == "READY"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


def test_export_killed_leaves_no_artifact(tmp_path: Path) -> None:
    target = tmp_path / "export" / "best"
    _kill_mid_export(target)
    assert not target.exists()


def test_export_killed_keeps_previous_artifact(tmp_path: Path) -> None:
    target = tmp_path / "export" / "best"
    export_module(TwoFiles(), target)
    _kill_mid_export(target)
    assert sorted(path.name for path in target.iterdir()) == ["config.json", "weights.bin"]
    assert (target / "weights.bin").read_bytes() == b"old"

    # The next export cleans up the dead process's staging directory and replaces the artifact.
    export_module(TwoFiles(), target)
    leftovers = [path.name for path in target.parent.iterdir() if path.name != "best"]
    assert leftovers == []


def test_export_restores_backup_after_crash_between_renames(tmp_path: Path) -> None:
    target = tmp_path / "best"
    export_module(TwoFiles(), target)
    # State after a crash right after "target -> backup" and before "staging -> target".
    target.rename(tmp_path / ".best.backup")
    with pytest.raises(RuntimeError), atomic_directory(target):
        raise RuntimeError("export failed")
    assert (target / "config.json").read_text() == '{"version": 1}'


def test_export_failure_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "best"
    export_module(TwoFiles(), target)
    with pytest.raises(ValueError), atomic_directory(target) as staging:
        (staging / "weights.bin").write_bytes(b"partial")
        raise ValueError("disk full")
    assert (target / "weights.bin").read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["best"]


class NaNAtStep(pl.LightningModule):
    """A linear regression whose loss becomes NaN at optimizer step ``bad_step``."""

    def __init__(self, bad_step: int):
        super().__init__()
        self.bad_step = bad_step
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_index: int) -> torch.Tensor:
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.layer(inputs), targets)
        if self.global_step == self.bad_step:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(
            torch.randn(32, 4, generator=generator), torch.randn(32, 1, generator=generator)
        )
        return torch.utils.data.DataLoader(data, batch_size=4)


def test_guard_stops_before_bad_step(tmp_path: Path) -> None:
    module = NaNAtStep(bad_step=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[NonFiniteLossGuard(), checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(NonFiniteLossError, match="global step 3"):
        trainer.fit(module)

    assert all(torch.isfinite(parameter).all() for parameter in module.parameters())
    saved = sorted(path.name for path in tmp_path.glob("*.ckpt"))
    assert saved == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"]
    last = torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=True)
    for name, value in module.state_dict().items():
        assert torch.equal(last["state_dict"][name], value)


def _draw() -> tuple[torch.Tensor, float, float]:
    return torch.rand(3), random.random(), float(np.random.rand())


def test_rng_state_round_trip() -> None:
    torch.manual_seed(1)
    state = collect_rng_state()
    expected = _draw()
    _draw()
    restore_rng_state(state)
    actual = _draw()
    assert torch.equal(expected[0], actual[0])
    assert expected[1] == actual[1]
    assert expected[2] == actual[2]


def _trainer_with(logger: object, tmp_path: Path) -> pl.Trainer:
    return pl.Trainer(logger=logger, default_root_dir=tmp_path, enable_progress_bar=False)


def test_media_helpers_skip_other_loggers(tmp_path: Path) -> None:
    trainer = _trainer_with(CSVLogger(tmp_path), tmp_path)
    assert log_table(trainer, "val/samples", ["text"], [["a"]]) is False
    assert log_image_grid(trainer, "val/images", torch.rand(2, 3, 8, 8)) is False
    assert log_table(None, "val/samples", ["text"], [["a"]]) is False


def test_media_helpers_log_to_wandb_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="paperlab-test")
    trainer = _trainer_with(logger, tmp_path)
    assert log_table(trainer, "val/samples", ["prompt", "score"], [["a cat", 0.5]]) is True
    assert (
        log_image_grid(trainer, "val/images", torch.rand(4, 3, 8, 8), captions=["a", "b", "c", "d"])
        is True
    )
    logger.experiment.finish()
    time.sleep(0.5)
    records = next(tmp_path.rglob("run-*.wandb")).read_bytes()
    assert b"val/samples" in records
    assert b"val/images" in records


def test_image_grid_keeps_pixel_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="paperlab-test")
    trainer = _trainer_with(logger, tmp_path)
    # Two 4 x 4 images of 0.6 and 0.2 side by side, with make_grid's 2-pixel zero padding.
    images = torch.stack([torch.full((3, 4, 4), 0.6), torch.full((3, 4, 4), 0.2)])
    assert log_image_grid(trainer, "val/images", images) is True
    logger.experiment.finish()
    (written,) = tmp_path.rglob("media/images/val/images_*.png")
    pixels = np.asarray(Image.open(written).convert("RGB"))
    assert pixels.shape == (8, 14, 3)
    assert (pixels[2:6, 2:6] == 153).all()  # round(0.6 * 255)
    assert (pixels[2:6, 8:12] == 51).all()  # round(0.2 * 255)
    assert (pixels[0] == 0).all()


def test_image_grid_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        log_image_grid(None, "val/images", torch.rand(3, 8, 8))
