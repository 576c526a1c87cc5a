"""paperlab command line: ``python train.py {fit,validate,test,predict} --config ...``.

Any LightningModule and LightningDataModule can be chosen by ``class_path`` (for
example ``lightning_modules.sciie.SciIE``); the method module is imported only then,
so ``--help`` stays fast. Several ``--config`` files compose left to right, and a later
file overrides the keys it sets: a method config, then a trainer or logger preset.

Weights & Biases is the default logger. Without ``WANDB_API_KEY`` in the environment
and without an explicit ``WANDB_MODE``, it runs offline and writes the run under
``runs/``; ``wandb sync`` uploads it later.
"""

from __future__ import annotations

import logging
import os

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from callbacks.guards import NonFiniteLossGuard
from callbacks.predictions import JsonlPredictionWriter
from callbacks.report import ValidationReport
from callbacks.rng import RngStateCheckpoint
from callbacks.run_config import SaveRunConfig


def trainer_defaults() -> dict:
    """Trainer settings that config files override, plus callbacks that are always present."""
    return {
        "default_root_dir": "runs",
        "logger": {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"save_dir": "runs", "project": "paperlab"},
        },
        # Added to the callbacks of the config files, not replaced by them.
        "callbacks": [
            RngStateCheckpoint(),
            NonFiniteLossGuard(),
            ValidationReport(),
            JsonlPredictionWriter(),
        ],
    }


def configure_wandb_mode() -> None:
    """Run W&B offline unless the user configured it (``WANDB_MODE``) or gave an API key."""
    if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"


def main(
    args: list[str] | None = None, cli_class: type[LightningCLI] = LightningCLI, run: bool = True
) -> LightningCLI:
    """Parse ``args`` (default: the command line), build model, data and trainer, and run."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    configure_wandb_mode()
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        trainer_defaults=trainer_defaults(),
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
