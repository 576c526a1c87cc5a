"""Shared test set-up: offline hubs, offline W&B, and a private cache directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCIERC_DIR = REPO_ROOT.parent / "shared" / "data" / "scierc"
TINY_CONFIG = REPO_ROOT / "configs" / "sciie" / "tiny.yaml"
CSV_LOGGER = REPO_ROOT / "configs" / "logger" / "csv.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point PAPERLAB_CACHE (demo corpus, converted weights) at a per-session directory."""
    cache = Path(os.environ.get("PAPERLAB_TEST_CACHE", tmp_path_factory.mktemp("paperlab-cache")))
    os.environ["PAPERLAB_CACHE"] = str(cache)
    return cache


def run_train(arguments: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` in ``cwd``; fail the test with its output on a non-zero exit."""
    # Distributed-launch variables left by another test would make Lightning join a
    # process group that no longer exists. WANDB_SERVICE, set once this process has used
    # W&B, would send the child's run to this process's W&B service, which writes the
    # run files after the child has exited.
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MASTER_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))
        and key not in ("RANK", "WANDB_SERVICE")
    }
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), environment.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        pytest.fail(
            f"train.py {' '.join(arguments)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def requires_scierc() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not SCIERC_DIR.is_dir(), reason=f"SciERC data not found at {SCIERC_DIR}"
    )


@pytest.fixture(scope="session")
def scorer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export a tiny random VP-Score (CLIP backbone, two aspects) for the diffusion methods."""
    import torch

    from callbacks.export import export_module
    from lightning_modules.backbones import Backbone
    from lightning_modules.reward_model import VPScore
    from tests.test_reward_model import TINY_CLIP
    from tests.test_text_to_image import MINILM_TOKENIZER

    torch.manual_seed(0)
    scorer = VPScore(
        Backbone(config=TINY_CLIP, tokenizer=MINILM_TOKENIZER),
        aspects=["prompt_following", "fidelity"],
        hidden_dim=8,
    )
    directory = tmp_path_factory.mktemp("scorer") / "export"
    export_module(scorer.eval(), directory)
    return directory


def fit_quietly(
    model,
    datamodule,
    root: Path,
    max_epochs: int,
    ckpt_path: str | None = None,
    store_rng: bool = True,
    **options,
):
    """Fit on the CPU without validation or logger, saving ``root/last.ckpt``.

    With ``store_rng`` the checkpoint also stores the RNG states (``RngStateCheckpoint``).
    Returns the trainer; ``options`` go to ``lightning.pytorch.Trainer``.
    """
    import lightning.pytorch as pl

    from callbacks.rng import RngStateCheckpoint

    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[
            *([RngStateCheckpoint()] if store_rng else []),
            pl.callbacks.ModelCheckpoint(dirpath=root, filename="last"),
        ],
        **options,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer
