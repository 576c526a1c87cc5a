"""Causal LM fits through train.py with a LoRA adapter: checkpoint contents and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train
from tests.conftest import CSV_LOGGER, REPO_ROOT

TINY_CONFIG = REPO_ROOT / "configs" / "causal_lm" / "tiny.yaml"
QUESTIONS = [
    ("Where was the author born?", "In a small coastal town."),
    ("What genre does she write?", "Historical mysteries."),
    ("Name one of her books.", "The Salt Ledger."),
    ("Who were her parents?", "A sailor and a librarian."),
    ("Which award did she win?", "The Lantern Prize."),
    ("What language does she write in?", "Portuguese."),
    ("How many novels has she published?", "Seven."),
    ("Where does she live now?", "In Lisbon."),
]


def _write_records(path: Path) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    return path


def _fit(root: Path, data: Path, *arguments: str) -> train.LightningCLI:
    return train.main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--config",
            str(CSV_LOGGER),
            "--data.init_args.train_file",
            str(data),
            "--data.init_args.val_file",
            str(data),
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.max_epochs",
            "3",
            "--trainer.default_root_dir",
            str(root),
            *arguments,
        ]
    )


def _checkpoint(cli: train.LightningCLI) -> Path:
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def test_adapter_resume_matches_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _write_records(tmp_path / "qa.jsonl")
    straight = _fit(tmp_path / "straight", data)
    stop = json.dumps(
        {"class_path": "tests.test_training.StopAfterEpochs", "init_args": {"epochs": 1}}
    )
    first = _fit(tmp_path / "first", data, f"--trainer.callbacks+={stop}")
    resumed = _fit(tmp_path / "resumed", data, "--ckpt_path", str(_checkpoint(first)))
    assert resumed.trainer.global_step == straight.trainer.global_step == 6

    expected = torch.load(_checkpoint(straight), map_location="cpu", weights_only=True)
    actual = torch.load(_checkpoint(resumed), map_location="cpu", weights_only=True)
    interrupted = torch.load(_checkpoint(first), map_location="cpu", weights_only=True)
    # Only the LoRA matrices are in the checkpoint; the frozen base is rebuilt and checked.
    model = straight.model.model
    trainable = {f"model.{name}" for name, value in model.named_parameters() if value.requires_grad}
    assert set(expected["state_dict"]) == trainable
    assert all(".lora_" in name for name in trainable)
    for name, value in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], value), name
        assert not torch.equal(interrupted["state_dict"][name], value), name
    expected_moments = [
        state["exp_avg"] for state in expected["optimizer_states"][0]["state"].values()
    ]
    actual_moments = [state["exp_avg"] for state in actual["optimizer_states"][0]["state"].values()]
    assert len(expected_moments) == len(trainable)
    assert all(torch.equal(a, b) for a, b in zip(actual_moments, expected_moments, strict=True))
