"""Training behaviour through train.py: resume, config round trip, DDP, bf16, W&B offline."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import train
from tests.conftest import CSV_LOGGER, REPO_ROOT, TINY_CONFIG, run_train

FAST = ["--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0"]


def _fit(tmp_path: Path, *arguments: str, fast: bool = True) -> train.LightningCLI:
    return train.main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--config",
            str(CSV_LOGGER),
            *(FAST if fast else []),
            "--trainer.default_root_dir",
            str(tmp_path),
            *arguments,
        ],
    )


def _last_checkpoint(cli: train.LightningCLI) -> Path:
    """The checkpoint of the unmonitored ModelCheckpoint, written after every epoch."""
    latest = [c for c in cli.trainer.checkpoint_callbacks if c.monitor is None]
    return Path(latest[0].best_model_path)


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


class StopAfterEpochs(pl.Callback):
    """Stop a fit after ``epochs`` epochs, as an interruption would, keeping max_epochs."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_resume_matches_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    straight = _fit(tmp_path / "straight", "--trainer.max_epochs", "3")
    stop = json.dumps({"class_path": f"{__name__}.StopAfterEpochs", "init_args": {"epochs": 1}})
    first = _fit(tmp_path / "first", "--trainer.max_epochs", "3", f"--trainer.callbacks+={stop}")
    assert first.trainer.current_epoch < 2
    first_checkpoint = _last_checkpoint(first)
    resumed = _fit(
        tmp_path / "resumed", "--trainer.max_epochs", "3", "--ckpt_path", str(first_checkpoint)
    )

    assert resumed.trainer.global_step == straight.trainer.global_step
    expected = _state(_last_checkpoint(straight))
    actual = _state(_last_checkpoint(resumed))
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert different == []
    # The first run really stopped early, so equality is not trivial.
    assert not all(
        torch.equal(expected[name], value) for name, value in _state(first_checkpoint).items()
    )


def test_saved_config_reproduces_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # Full validation and test splits (limit 4 batches each in the tiny config).
    fit = _fit(tmp_path / "fit", "--trainer.max_epochs", "2", fast=False)
    checkpoint_callback = fit.trainer.checkpoint_callback
    run_directory = Path(checkpoint_callback.dirpath).parent
    saved_config = run_directory / "config.yaml"
    assert saved_config.is_file()

    # The tiny config's test split is its validation split, so the test metrics of the
    # best checkpoint must equal the validation metrics that made it the best.
    best = Path(checkpoint_callback.best_model_path)
    tested = train.main(["test", "--config", str(saved_config), "--ckpt_path", str(best)])
    validated = train.main(["validate", "--config", str(saved_config), "--ckpt_path", str(best)])

    best_score = float(checkpoint_callback.best_model_score)
    assert float(tested.trainer.callback_metrics["test/avg_f1"]) == pytest.approx(
        best_score, abs=1e-6
    )
    assert float(validated.trainer.callback_metrics["val/avg_f1"]) == pytest.approx(
        best_score, abs=1e-6
    )
    for name in ("ner/f1", "rel/f1", "coref/avg_f1"):
        assert float(tested.trainer.callback_metrics[f"test/{name}"]) == pytest.approx(
            float(validated.trainer.callback_metrics[f"val/{name}"]), abs=1e-6
        )


def test_bf16_mixed_fit_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = _fit(tmp_path, "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed")
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.trainer.global_step > 0
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    run_train(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--config",
            str(REPO_ROOT / "configs/trainer/ddp.yaml"),
            "--config",
            str(CSV_LOGGER),
            *FAST,
            "--trainer.accelerator",
            "cpu",
            "--trainer.max_epochs",
            "1",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    metrics_files = list(tmp_path.rglob("metrics.csv"))
    assert len(metrics_files) == 1
    header = metrics_files[0].read_text().splitlines()[0].split(",")
    assert "val/ner/f1" in header
    assert list(tmp_path.rglob("export/last/sciie.json"))


def test_export_of_cli_run_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_modules.sciie import SciIE

    monkeypatch.chdir(tmp_path)
    fit = _fit(tmp_path, "--trainer.max_epochs", "1")
    export = Path(fit.trainer.checkpoint_callback.dirpath).parent / "export" / "best"
    model = SciIE.from_export(export)
    assert model.hparams.entity_types == fit.model.hparams.entity_types
    records = model.extract(["We propose a parser. It is fast."])
    assert records[0]["sentences"] == [
        ["We", "propose", "a", "parser", "."],
        ["It", "is", "fast", "."],
    ]
    with pytest.raises(TypeError, match="list of strings"):
        model.extract("We propose a parser.")


def test_wandb_offline_run_files(tmp_path: Path) -> None:
    # No logger preset: W&B is the default logger, offline without credentials.
    run_train(
        ["fit", "--config", str(TINY_CONFIG), *FAST, "--trainer.max_epochs", "1"], cwd=tmp_path
    )
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run log is W&B's binary record stream; each logged key is stored as text in it.
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in ("train/loss", "val/ner/f1", "val/rel/f1", "val/rel_strict/f1", "val/coref/avg_f1"):
        assert key.encode() in records
    assert b"val/not_logged" not in records
    # The sample table of the first validation batch.
    assert b"val/samples" in records


def test_predict_writes_records_for_raw_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fit = _fit(tmp_path / "fit", "--trainer.max_epochs", "1")
    inputs = tmp_path / "texts.jsonl"
    inputs.write_text(
        json.dumps({"doc_key": "a", "text": "We propose a parser. It is fast."})
        + "\n"
        + json.dumps({"doc_key": "b", "sentences": [["Graphs", "help", "."]]})
        + "\n"
    )
    output = tmp_path / "predictions.jsonl"
    saved_config = Path(fit.trainer.checkpoint_callback.dirpath).parent / "config.yaml"
    train.main(
        [
            "predict",
            "--config",
            str(saved_config),
            "--ckpt_path",
            str(_last_checkpoint(fit)),
            "--data.init_args.predict_file",
            str(inputs),
            f'--trainer.callbacks+={{"class_path": "callbacks.predictions.JsonlPredictionWriter", '
            f'"init_args": {{"output_file": "{output}"}}}}',
        ],
    )
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["doc_key"] for record in records] == ["a", "b"]
    assert records[0]["sentences"] == [
        ["We", "propose", "a", "parser", "."],
        ["It", "is", "fast", "."],
    ]
    for record in records:
        assert len(record["ner"]) == len(record["sentences"])
        assert len(record["relations"]) == len(record["sentences"])
        assert isinstance(record["clusters"], list)
