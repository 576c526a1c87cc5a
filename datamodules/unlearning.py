"""Forget and retain data for LLM unlearning, in one batch stream.

Training batches are mappings ``{"forget": [...], "retain": [...]}`` of
:class:`datamodules.prompt_response.PromptResponse` lists, plus ``"refusal"`` when a
refusal file is given: the forget questions of the same batch, in the same order, each
with a refusal answer (the target of the PO objective). An epoch is one pass over the
forget set; the retain loader is reshuffled every epoch and runs alongside it
(Lightning's ``CombinedLoader`` in ``min_size`` mode). Validation batches have the same
keys: the whole forget set, unshuffled, beside as many retain records.

Files are read with :func:`datamodules.prompt_response.read_prompt_response` (JSON
Lines of objects or of arrays, as TOFU's files are). The refusal file has one answer
per line as plain text, as TOFU's ``idontknow.jsonl`` does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import torch

from datamodules.loading import record_loader
from datamodules.prompt_response import PromptResponse, read_prompt_response


def read_refusals(path: str | Path) -> list[str]:
    """Return the non-empty lines of ``path``, one refusal answer each."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refusal file {path} not found; give one answer per line.")
    refusals = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    refusals = [line for line in refusals if line]
    if not refusals:
        raise ValueError(f"refusal file {path} has no non-empty line; give one answer per line.")
    return refusals


def with_refusals(
    records: list[PromptResponse], refusals: list[str], seed: int
) -> list[PromptResponse]:
    """Return copies of ``records`` whose responses are refusals drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    choice = torch.randint(len(refusals), (len(records),), generator=generator).tolist()
    return [
        replace(record, response=refusals[index])
        for record, index in zip(records, choice, strict=True)
    ]


class UnlearningDataModule(pl.LightningDataModule):
    """Forget and retain records in one stream (see the module docstring).

    Args:
        forget_file: the records to unlearn (e.g. TOFU ``forget01.json``).
        retain_file: the records to keep (e.g. TOFU ``retain90.json``).
        refusal_file: refusal answers, one per line, for the PO objective; None leaves
            the ``refusal`` key out.
        prompt_field: name of the prompt field.
        response_field: name of the response field.
        batch_size: forget records per batch.
        retain_batch_size: retain records per batch; None uses ``batch_size``.
        num_workers: DataLoader worker processes.
        seed: shuffling seed (the epoch number is added each epoch) and refusal draws.
    """

    def __init__(
        self,
        forget_file: str,
        retain_file: str,
        refusal_file: str | None = None,
        prompt_field: str = "question",
        response_field: str = "answer",
        batch_size: int = 4,
        retain_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1 or (retain_batch_size is not None and retain_batch_size < 1):
            raise ValueError(
                f"batch_size={batch_size} and retain_batch_size={retain_batch_size} must be "
                "at least 1 (retain_batch_size may be None)."
            )
        self.save_hyperparameters()
        self.forget: list[PromptResponse] = []
        self.retain: list[PromptResponse] = []
        self.refusal: list[PromptResponse] | None = None

    def setup(self, stage: str) -> None:
        if self.forget:
            return
        hparams = self.hparams
        fields = (hparams.prompt_field, hparams.response_field)
        self.forget = read_prompt_response(hparams.forget_file, *fields)
        self.retain = read_prompt_response(hparams.retain_file, *fields)
        if hparams.refusal_file is not None:
            refusals = read_refusals(hparams.refusal_file)
            self.refusal = with_refusals(self.forget, refusals, hparams.seed)

    def _loaders(self, forget: list, retain: list, refusal: list | None, shuffle: bool) -> dict:
        hparams = self.hparams
        retain_size = hparams.retain_batch_size or hparams.batch_size
        workers, seed = hparams.num_workers, hparams.seed
        loaders = {
            "forget": record_loader(forget, hparams.batch_size, shuffle, seed, workers),
            # A different seed, so the retain order is not tied to the forget order.
            "retain": record_loader(retain, retain_size, shuffle, seed + 1, workers),
        }
        if refusal is not None:
            # The forget loader's seed and size: the same questions in the same order.
            loaders["refusal"] = record_loader(refusal, hparams.batch_size, shuffle, seed, workers)
        return loaders

    def train_dataloader(self):
        from lightning.pytorch.utilities import CombinedLoader

        loaders = self._loaders(self.forget, self.retain, self.refusal, shuffle=True)
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self):
        from lightning.pytorch.utilities import CombinedLoader

        retain = self.retain[: len(self.forget)]
        loaders = self._loaders(self.forget, retain, self.refusal, shuffle=False)
        return CombinedLoader(loaders, mode="min_size")
