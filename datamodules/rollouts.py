"""On-policy training data: batches built each epoch from the model's own samples.

Methods such as DDPO and online Diffusion-DPO alternate between sampling from the current
model and training on those samples. Here that alternation is an ordinary Lightning
epoch. The training DataLoader wraps a :class:`RolloutDataset`, whose iterator calls the
LightningModule (an :class:`OnPolicyMethod`) to sample and then yields the training
batches the module makes of the samples. Lightning creates a new iterator at the start of
every epoch, so each epoch samples afresh from the weights of that moment, and no second
training loop is written by hand.

Randomness: the prompts of an epoch and the module's sampling noise come from a CPU
generator seeded with (``seed``, epoch, global rank), so an epoch resumed from a
checkpoint written at an epoch boundary samples exactly what the uninterrupted run did.
A checkpoint written mid-epoch resumes by sampling that epoch again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset


@runtime_checkable
class OnPolicyMethod(Protocol):
    """Interface of a LightningModule that trains on its own samples.

    ``rollout_prompt_count()`` prompts are drawn per epoch; ``rollout_batches`` samples
    for them with noise from ``generator``. It then yields exactly
    ``rollout_batch_count()`` training batches.
    """

    current_epoch: int
    global_rank: int

    def rollout_prompt_count(self) -> int: ...

    def rollout_batch_count(self) -> int: ...

    def rollout_batches(
        self, prompts: list[str], generator: torch.Generator
    ) -> Iterator[dict[str, Any]]: ...


class RolloutDataset(IterableDataset):
    """Each iteration draws prompts, lets ``method`` sample for them, and yields its batches.

    Args:
        method: the module being trained.
        prompts: the pool that each epoch's prompts are drawn from, uniformly with
            replacement (as DDPO draws them).
        seed: seed of the prompt draws and the sampling noise.
    """

    def __init__(self, method: OnPolicyMethod, prompts: Sequence[str], seed: int):
        if not prompts:
            raise ValueError("RolloutDataset needs at least one prompt; the prompt pool is empty.")
        self.method = method
        self.prompts = list(prompts)
        self.seed = seed

    def generator(self) -> torch.Generator:
        """Return the CPU generator of the current epoch on this rank."""
        epoch, rank = self.method.current_epoch, self.method.global_rank
        # Distinct streams for every (seed, epoch, rank); the multipliers are large primes.
        return torch.Generator().manual_seed(self.seed + 1_000_003 * epoch + 7_919 * rank)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        generator = self.generator()
        count = self.method.rollout_prompt_count()
        choice = torch.randint(len(self.prompts), (count,), generator=generator).tolist()
        yield from self.method.rollout_batches([self.prompts[i] for i in choice], generator)

    def __len__(self) -> int:
        return self.method.rollout_batch_count()


class RolloutDataModule(pl.LightningDataModule):
    """Training batches from the model's own samples; validation from a prompt module.

    The training prompts are all prompts of ``prompts``' training loader, read when the
    training DataLoader is built (once per fit, unless the trainer reloads DataLoaders);
    the LightningModule must be an :class:`OnPolicyMethod`. Validation batches are
    ``prompts``' validation prompts, unchanged.

    Args:
        prompts: a data module whose loaders yield lists of prompts
            (``PromptDataModule``, ``DigitsPromptDataModule`` or
            ``PreferencePromptDataModule``).
        seed: seed of the prompt draws and of the sampling noise.
    """

    def __init__(self, prompts: pl.LightningDataModule, seed: int = 0):
        super().__init__()
        self.prompts = prompts
        self.seed = seed

    def prepare_data(self) -> None:
        self.prompts.prepare_data()

    def setup(self, stage: str) -> None:
        self.prompts.trainer = self.trainer
        self.prompts.setup(stage)

    def train_dataloader(self) -> DataLoader:
        method = self.trainer.lightning_module
        if not isinstance(method, OnPolicyMethod):
            raise TypeError(
                f"RolloutDataModule trains on the model's own samples, but "
                f"{type(method).__name__} does not provide rollout_prompt_count, "
                "rollout_batch_count and rollout_batches; use it with DDPO, "
                "DiffusionDPO(pairs_from='samples') or TSAlign, or choose another data module."
            )
        prompts = [prompt for batch in self.prompts.train_dataloader() for prompt in batch]
        # batch_size=None: the module's batches pass through as they are. Each new
        # iterator draws a seed from ``generator``, not from the global generator. A resumed
        # run creates its first iterator before the checkpoint's RNG state is restored, so
        # a global draw would shift the dropout masks of the training steps.
        return DataLoader(
            RolloutDataset(method, prompts, self.seed),
            batch_size=None,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self.prompts.val_dataloader()
