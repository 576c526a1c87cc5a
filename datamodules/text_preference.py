"""Text preference pairs (a prompt, a chosen and a rejected response) for DPO and reward models.

Two file formats, both JSON Lines (gzip-compressed when the name ends in ``.gz``):

- ``pairs``: one object per line with ``prompt``, ``chosen`` and ``rejected`` strings
  (other field names by argument). The prompt may instead be a list of chat messages
  ``{"role", "content"}`` ending with a user turn.
- ``hh_rlhf``: Anthropic's HH-RLHF, ``{"chosen": transcript, "rejected": transcript}``,
  each a whole conversation of "\\n\\nHuman: ..." and "\\n\\nAssistant: ..." turns. The
  prompt is the conversation before the final assistant turn and the responses are the
  two final turns. In a few records one side's final turn itself contains turn markers.
  The split is therefore made at the last "\\n\\nAssistant:" of the text that both sides
  share, not of each side alone, and both sides get the same prompt
  (:func:`split_hh_rlhf`).
  Pairs with an empty final turn on either side (4 of the 2,312 harmless-base test
  pairs) are skipped with a warning that lists their lines.

A file may serve as both splits: ``val_size`` records, drawn with ``seed``, are held out
for validation and the rest train.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from datamodules.jsonl import DataValidationError, read_json_lines
from datamodules.loading import record_loader

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class PreferencePair:
    """A prompt with a preferred and a dispreferred response, and where it was read from."""

    prompt: str | Messages
    chosen: str
    rejected: str
    location: str


def transcript_messages(transcript: str) -> Messages:
    """Parse a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript into chat messages.

    Consecutive turns of one role (4 harmless-base test transcripts have two human turns
    in a row) are merged into one message, blank-line separated, because chat templates
    such as Llama-2's require the roles to alternate.
    """
    parts = _TURN.split(transcript)
    # parts = [text before the first marker, role, content, role, content, ...]
    if parts[0].strip():
        raise ValueError(f"the transcript does not start with a turn marker: {parts[0][:60]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages: Messages = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        if messages and messages[-1]["role"] == roles[role]:
            messages[-1]["content"] += "\n\n" + content.strip()
        else:
            messages.append({"role": roles[role], "content": content.strip()})
    return messages


def split_hh_rlhf(chosen: str, rejected: str) -> tuple[Messages, str, str]:
    """Split two HH-RLHF transcripts into (shared conversation, chosen turn, rejected turn).

    The split point is the last "\\n\\nAssistant:" within the longest common prefix of
    the two transcripts. The conversation before it must end with a human turn.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError('the two transcripts share no "\\n\\nAssistant:" turn')
    messages = transcript_messages(chosen[:cut])
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(
            "the conversation before the final assistant turn does not end with a human turn"
        )
    start = cut + len(ASSISTANT)
    return messages, chosen[start:].strip(), rejected[start:].strip()


def _text(path: Path, line: int, data: dict, name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataValidationError(
            path,
            line,
            name,
            value,
            "missing" if value is None else "expected a non-empty string",
            f"give every record a non-empty {name!r} string (keys found: {sorted(data)})",
        )
    return value


def read_preference_pairs(
    path: str | Path,
    format: Literal["pairs", "hh_rlhf"] = "pairs",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> list[PreferencePair]:
    """Read and validate every pair of ``path`` (see the module docstring for the formats).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataValidationError: a line is not a JSON object, lacks a field, or (HH-RLHF)
            cannot be split into a prompt and two responses; the message names the
            file, line and field.
        ValueError: the file has no pairs.
    """
    if format not in ("pairs", "hh_rlhf"):
        raise ValueError(f"format={format!r}; use 'pairs' or 'hh_rlhf'.")
    path = Path(path)
    pairs, empty = [], []
    for line, data in read_json_lines(path, "one JSON object per line"):
        if not isinstance(data, dict):
            raise DataValidationError(
                path, line, "<line>", data, "expected a JSON object", "write one object per line"
            )
        chosen, rejected = (
            _text(path, line, data, chosen_field),
            _text(path, line, data, rejected_field),
        )
        location = f"{path}:{line}"
        if format == "hh_rlhf":
            try:
                prompt, chosen, rejected = split_hh_rlhf(chosen, rejected)
            except ValueError as error:
                raise DataValidationError(
                    path,
                    line,
                    chosen_field,
                    chosen,
                    str(error),
                    "give HH-RLHF transcripts that share the conversation before the final "
                    '"\\n\\nAssistant:" turn, or use format "pairs"',
                ) from None
            if not chosen or not rejected:
                empty.append(line)
                continue
        else:
            prompt = data.get(prompt_field)
            if not (isinstance(prompt, str) and prompt.strip()) and not _is_messages(prompt):
                raise DataValidationError(
                    path,
                    line,
                    prompt_field,
                    prompt,
                    "expected a non-empty string or a list of chat messages",
                    f'give {prompt_field!r} as text or as [{{"role": "user", "content": ...}}]',
                )
        pairs.append(PreferencePair(prompt, chosen, rejected, location))
    if empty:
        log.warning(
            "%s: skipped %d HH-RLHF pairs whose final assistant turn is empty (lines %s)",
            path,
            len(empty),
            ", ".join(map(str, empty)),
        )
    if not pairs:
        raise ValueError(f"{path} contains no preference pairs.")
    return pairs


def _is_messages(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
        and value[-1]["role"] == "user"
    )


def held_out_split(count: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Return (train indices, validation indices): ``val_size`` of ``count`` drawn with ``seed``."""
    if not 0 <= val_size < count:
        raise ValueError(f"val_size={val_size} must be at least 0 and below the {count} records.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[val_size:]), sorted(order[:val_size])


class TextPreferenceDataModule(pl.LightningDataModule):
    """Preference pairs for DPO and reward models; batches are lists of :class:`PreferencePair`.

    Args:
        train_file: the pairs (see the module docstring).
        val_file: validation pairs; None holds out ``val_size`` pairs of ``train_file``.
        format: ``pairs`` or ``hh_rlhf``.
        val_size: pairs of ``train_file`` held out for validation when ``val_file`` is None.
        prompt_field, chosen_field, rejected_field: field names (format ``pairs``).
        batch_size: pairs per batch.
        num_workers: DataLoader worker processes.
        seed: the held-out draw and the shuffling (the epoch number is added each epoch).
        max_train_pairs: use only the first N training pairs (None: all).
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        format: Literal["pairs", "hh_rlhf"] = "pairs",
        val_size: int = 0,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        max_train_pairs: int | None = None,
    ):
        super().__init__()
        if batch_size < 1 or (max_train_pairs is not None and max_train_pairs < 1):
            raise ValueError(
                f"batch_size={batch_size} and max_train_pairs={max_train_pairs} must be at "
                "least 1 (max_train_pairs may be None)."
            )
        self.save_hyperparameters()
        self.splits: dict[str, list[PreferencePair]] = {}

    def _read(self, path: str) -> list[PreferencePair]:
        hparams = self.hparams
        return read_preference_pairs(
            path, hparams.format, hparams.prompt_field, hparams.chosen_field, hparams.rejected_field
        )

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        hparams = self.hparams
        pairs = self._read(hparams.train_file)
        if hparams.val_file is not None:
            train, val = pairs, self._read(hparams.val_file)
        else:
            train_index, val_index = held_out_split(len(pairs), hparams.val_size, hparams.seed)
            train, val = [pairs[i] for i in train_index], [pairs[i] for i in val_index]
        self.splits = {"train": train[: hparams.max_train_pairs], "val": val}

    def train_dataloader(self) -> DataLoader:
        hparams = self.hparams
        return record_loader(
            self.splits["train"], hparams.batch_size, True, hparams.seed, hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.splits["val"]:
            return []
        hparams = self.hparams
        return record_loader(
            self.splits["val"], hparams.batch_size, False, hparams.seed, hparams.num_workers
        )


class PreferencePromptDataModule(pl.LightningDataModule):
    """The prompts of a preference file, for methods that sample their own responses.

    TS-Align trains on responses its policy generates, so it needs prompts only. This
    module reads the pairs as :class:`TextPreferenceDataModule` does and holds out the
    same ``val_size`` pairs for the same ``seed``, so the validation prompts are those of
    the pairs that a reward model trained with that module held out. Each split keeps
    its distinct prompts in file order, and a prompt of both splits (a file may repeat
    a prompt in several pairs) stays out of the training prompts. Batches are lists of
    prompts: a string, or a list of chat messages for a multi-turn prompt.

    Args:
        file: the pairs (see the module docstring for the formats).
        format: ``pairs`` or ``hh_rlhf``.
        val_size: pairs held out; their prompts are the validation prompts.
        single_turn: keep only prompts that are one user message, as plain strings.
        max_val_prompts: keep only the first N validation prompts (None: all).
        prompt_field, chosen_field, rejected_field: field names (format ``pairs``).
        batch_size: prompts per batch.
        seed: the held-out draw.
    """

    def __init__(
        self,
        file: str,
        format: Literal["pairs", "hh_rlhf"] = "pairs",
        val_size: int = 0,
        single_turn: bool = False,
        max_val_prompts: int | None = None,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        batch_size: int = 8,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1 or (max_val_prompts is not None and max_val_prompts < 1):
            raise ValueError(
                f"batch_size={batch_size} and max_val_prompts={max_val_prompts} must be at "
                "least 1 (max_val_prompts may be None)."
            )
        # Plain attributes, not save_hyperparameters: inside RolloutDataModule, LightningCLI
        # would give this module the outer data module's hyper-parameters.
        self.file, self.format, self.val_size = file, format, val_size
        self.single_turn, self.max_val_prompts = single_turn, max_val_prompts
        self.fields = (prompt_field, chosen_field, rejected_field)
        self.batch_size, self.seed = batch_size, seed
        self.splits: dict[str, list[str | Messages]] = {}

    @staticmethod
    def _key(prompt: str | Messages) -> str:
        return prompt if isinstance(prompt, str) else repr(prompt)

    def _prompts(self, pairs: list[PreferencePair]) -> list[str | Messages]:
        prompts, seen = [], set()
        for pair in pairs:
            prompt = pair.prompt
            if self.single_turn:
                if isinstance(prompt, list):
                    if len(prompt) != 1:
                        continue
                    prompt = prompt[0]["content"]
            key = self._key(prompt)
            if key not in seen:
                seen.add(key)
                prompts.append(prompt)
        return prompts

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        pairs = read_preference_pairs(self.file, self.format, *self.fields)
        train_index, val_index = held_out_split(len(pairs), self.val_size, self.seed)
        val = self._prompts([pairs[i] for i in val_index])[: self.max_val_prompts]
        held_out = {self._key(prompt) for prompt in val}
        train = [
            prompt
            for prompt in self._prompts([pairs[i] for i in train_index])
            if self._key(prompt) not in held_out
        ]
        if not train:
            raise ValueError(
                f"{self.file} leaves no training prompts (single_turn={self.single_turn}, "
                f"val_size={self.val_size}); lower val_size or set single_turn to false."
            )
        self.splits = {"train": train, "val": val}

    def train_dataloader(self) -> DataLoader:
        return record_loader(self.splits["train"], self.batch_size, True, self.seed)

    def val_dataloader(self) -> DataLoader | list:
        if not self.splits["val"]:
            return []
        return record_loader(self.splits["val"], self.batch_size, False, 0)
