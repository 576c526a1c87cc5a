"""Direct preference optimization of a causal LM on prompt/chosen/rejected pairs.

For each pair the policy pi and the frozen reference pi_ref score both responses:
log pi(y|x) is the sum of the response tokens' log-probabilities (their mean for the
length-normalized losses, IPO). The loss is one of
:data:`lightning_modules.losses.preference.PREFERENCE_LOSSES` (``sigmoid`` DPO with
label smoothing, ``ipo``, ``hinge``) of the log-ratios log pi - log pi_ref.

The chosen and the rejected responses of a batch go through the model in one forward
pass of 2P rows (chosen rows first). The reference is the starting model: with a peft
adapter the same model with the adapter switched off, otherwise a frozen copy. With
``precompute_reference`` the reference log-probabilities of every training and
validation pair are computed once when fitting starts, and steps then run the policy
alone.

Logged under the keys TRL and torchtune use, prefixed by the split: ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected``, and ``loss``.
"""

from __future__ import annotations

from typing import Literal

import peft
import torch
from torch import Tensor

from datamodules.prompt_response import PromptResponse
from datamodules.text_preference import PreferencePair
from lightning_modules.adapters import BitFit
from lightning_modules.backbones import Backbone
from lightning_modules.causal_lm import CausalLM, TokenBatch
from lightning_modules.losses.preference import (
    LENGTH_NORMALIZED,
    PREFERENCE_LOSSES,
    preference_diagnostics,
)
from lightning_modules.losses.unlearning import response_log_probs


class DPO(CausalLM):
    """Preference optimization of a causal LM (see the module docstring).

    Args:
        model: the policy's starting point (``pretrained`` or ``config``).
        loss: ``sigmoid`` (DPO), ``ipo`` or ``hinge``.
        beta: inverse temperature of the implicit reward beta * log(pi / pi_ref).
        label_smoothing: assumed share of flipped labels (``sigmoid`` only).
        precompute_reference: score every pair under the reference once, when fitting
            starts, instead of at every step.
        peft: a peft config or ``BitFit``; None trains every parameter.
        max_length: maximum tokens per prompt and response. Longer ones lose the
            beginning of the prompt (down to half of ``max_length``), then the end of
            the response.
        learning_rate: AdamW learning rate (when no ``optimizer`` is configured).
        weight_decay: AdamW weight decay.
        export_merged: with a peft adapter, also export the merged model.
    """

    def __init__(
        self,
        model: Backbone,
        loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        precompute_reference: bool = False,
        peft: peft.PeftConfig | BitFit | None = None,
        max_length: int = 512,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        export_merged: bool = False,
    ):
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(
                f"Invalid DPO arguments: loss={loss!r}; use one of {sorted(PREFERENCE_LOSSES)}."
            )
        if beta <= 0 or not 0 <= label_smoothing < 0.5:
            raise ValueError(
                f"Invalid DPO arguments: beta={beta} must be positive and "
                f"label_smoothing={label_smoothing} in [0, 0.5)."
            )
        super().__init__(
            model,
            peft=peft,
            max_length=max_length,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            export_merged=export_merged,
        )
        self.hparams.update(
            {
                "loss": loss,
                "beta": beta,
                "label_smoothing": label_smoothing,
                "precompute_reference": precompute_reference,
            }
        )
        self.keep_reference()
        # pair location -> (reference log p of chosen, of rejected)
        self.reference_cache: dict[str, tuple[float, float]] = {}

    # ------------------------------------------------------------------ scoring

    @staticmethod
    def pair_records(pairs: list[PreferencePair]) -> list[PromptResponse]:
        """Return the chosen then the rejected responses of ``pairs`` as 2P records."""
        chosen = [PromptResponse(pair.prompt, pair.chosen, pair.location) for pair in pairs]
        rejected = [PromptResponse(pair.prompt, pair.rejected, pair.location) for pair in pairs]
        return chosen + rejected

    def pair_tokens(self, pairs: list[PreferencePair]) -> TokenBatch:
        """Tokenize the chosen then the rejected responses of ``pairs``: 2P rows."""
        return self.featurize(self.pair_records(pairs)).to(self.device)

    def _sequence_log_probs(self, logits: Tensor, labels: Tensor) -> Tensor:
        sums, counts = response_log_probs(logits, labels)
        if self.hparams.loss in LENGTH_NORMALIZED:
            return sums / counts.clamp(min=1)
        return sums

    def policy_log_probs(self, batch: TokenBatch) -> tuple[Tensor, Tensor]:
        """Return the policy's (chosen [P], rejected [P]) log-probabilities, with a graph."""
        return self._sequence_log_probs(self.token_logits(batch), batch.labels).chunk(2)

    @torch.no_grad()
    def reference_log_probs(
        self, pairs: list[PreferencePair], batch: TokenBatch | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return the reference's (chosen [P], rejected [P]) log-probabilities."""
        if pairs and all(pair.location in self.reference_cache for pair in pairs):
            values = torch.tensor(
                [self.reference_cache[pair.location] for pair in pairs], device=self.device
            )
            return values[:, 0], values[:, 1]
        batch = batch if batch is not None else self.pair_tokens(pairs)
        return self._sequence_log_probs(self.reference_logits(batch), batch.labels).chunk(2)

    def preference_loss(self, pairs: list[PreferencePair]) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the mean loss over ``pairs`` and the diagnostics of the module docstring."""
        batch = self.pair_tokens(pairs)
        policy_chosen, policy_rejected = self.policy_log_probs(batch)
        reference_chosen, reference_rejected = self.reference_log_probs(pairs, batch)
        chosen = policy_chosen - reference_chosen
        rejected = policy_rejected - reference_rejected
        hparams = self.hparams
        losses = PREFERENCE_LOSSES[hparams.loss](
            chosen, rejected, hparams.beta, hparams.label_smoothing
        )
        diagnostics = preference_diagnostics(
            chosen, rejected, hparams.beta, policy_chosen, policy_rejected
        )
        return losses.mean(), diagnostics

    # ------------------------------------------------------------------ Lightning

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.hparams.get("precompute_reference", False):
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError(
                "precompute_reference needs the pairs from a LightningDataModule; pass one "
                "to fit, or set precompute_reference to false."
            )
        # Scored as the steps would score them: in eval mode (no dropout) and under the
        # trainer's precision, so that the log-ratios of the starting policy are 0.
        was_training = self.training
        self.eval()
        try:
            with self.trainer.precision_plugin.forward_context():
                for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
                    for pairs in loader:
                        self._cache_reference(pairs)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def _cache_reference(self, pairs: list[PreferencePair]) -> None:
        missing = [pair for pair in pairs if pair.location not in self.reference_cache]
        if not missing:
            return
        chosen, rejected = self.reference_log_probs(missing)
        for pair, chosen_value, rejected_value in zip(
            missing, chosen.tolist(), rejected.tolist(), strict=True
        ):
            self.reference_cache[pair.location] = (chosen_value, rejected_value)

    def _log(self, split: str, loss: Tensor, diagnostics: dict[str, Tensor], size: int) -> None:
        sync = split != "train"
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=size, sync_dist=sync)
        for name, value in diagnostics.items():
            self.log(f"{split}/{name}", value, batch_size=size, sync_dist=sync)

    def training_step(self, pairs: list[PreferencePair], batch_index: int) -> Tensor:
        loss, diagnostics = self.preference_loss(pairs)
        self._log("train", loss, diagnostics, len(pairs))
        return loss

    def validation_step(self, pairs: list[PreferencePair], batch_index: int) -> None:
        loss, diagnostics = self.preference_loss(pairs)
        self._log("val", loss, diagnostics, len(pairs))

    # Sophia's Hessian refresh, on the chosen and rejected responses of the step.

    def hessian_logits(self, pairs: list[PreferencePair]) -> tuple[Tensor, Tensor]:
        return super().hessian_logits(self.pair_records(pairs))

    def hessian_loss(self, pairs: list[PreferencePair]) -> Tensor:
        return self.preference_loss(pairs)[0]
