"""LLM unlearning: make a causal LM forget a forget set while keeping a retain set.

Each training batch contains forget records, retain records and, for PO, the forget
questions with refusal answers (:class:`datamodules.unlearning.UnlearningDataModule`).
The objective is one of (see :mod:`lightning_modules.losses.unlearning`):

- ``ga``: gradient ascent, -NLL(forget);
- ``grad_diff``: -NLL(forget) + gamma * NLL(retain);
- ``npo``: (2 / beta) mean(softplus(beta (log pi - log pi_ref))) on the forget answers,
  + gamma * NLL(retain);
- ``po``: NLL(refusal answers to the forget questions) + gamma * NLL(retain);

plus ``kl_weight`` * KL(pi_ref || pi) on the retain tokens when ``kl_weight`` > 0. The
reference pi_ref is the starting model: with a peft adapter, the same model with the
adapter switched off; otherwise a frozen copy made when the module is built.

The optimizer is a config choice, AdamW (the default) or Sophia (SOUL):
``--optimizer lightning_modules.optim.Sophia`` with the
``callbacks.hessian.HessianRefresh`` callback, which calls :meth:`hessian_logits` or
:meth:`hessian_loss` on the step's batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import peft
import torch
from torch import Tensor

from datamodules.prompt_response import PromptResponse
from lightning_modules.adapters import BitFit
from lightning_modules.backbones import Backbone
from lightning_modules.causal_lm import CausalLM, TokenBatch
from lightning_modules.losses.unlearning import (
    gradient_ascent_loss,
    gradient_difference_loss,
    mean_nll,
    npo_loss,
    response_log_probs,
    retain_kl,
)

Batch = dict[str, list[PromptResponse]]


def _ga(module: Unlearning, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    forget_nll = module.nll(batch["forget"])
    return gradient_ascent_loss(forget_nll), {"forget_nll": forget_nll}


def _grad_diff(module: Unlearning, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    forget_nll, retain_nll = module.nll(batch["forget"]), module.nll(batch["retain"])
    loss = gradient_difference_loss(forget_nll, retain_nll, module.hparams.gamma)
    return loss, {"forget_nll": forget_nll, "retain_nll": retain_nll}


def _npo(module: Unlearning, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    forget = module.tokens(batch["forget"])
    policy, _ = response_log_probs(module.token_logits(forget), forget.labels)
    with torch.no_grad():
        reference, _ = response_log_probs(module.reference_logits(forget), forget.labels)
    retain_nll = module.nll(batch["retain"])
    loss = npo_loss(policy, reference, module.hparams.beta) + module.hparams.gamma * retain_nll
    return loss, {
        "forget_log_ratio": (policy - reference).mean().detach(),
        "retain_nll": retain_nll,
    }


def _po(module: Unlearning, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    if "refusal" not in batch:
        raise ValueError(
            "objective 'po' needs refusal answers; set the data module's refusal_file "
            "(e.g. TOFU's idontknow.jsonl)."
        )
    refusal_nll, retain_nll = module.nll(batch["refusal"]), module.nll(batch["retain"])
    loss = refusal_nll + module.hparams.gamma * retain_nll
    return loss, {"refusal_nll": refusal_nll, "retain_nll": retain_nll}


# objective name -> (module, batch) -> (loss, logged terms)
OBJECTIVES: dict[str, Callable[[Unlearning, Batch], tuple[Tensor, dict[str, Tensor]]]] = {
    "ga": _ga,
    "grad_diff": _grad_diff,
    "npo": _npo,
    "po": _po,
}


class Unlearning(CausalLM):
    """Unlearn with one of the objectives of the module docstring.

    Args:
        model: the causal LM to unlearn from (``pretrained`` or ``config``).
        objective: ``ga``, ``grad_diff``, ``npo`` or ``po``.
        gamma: weight of the retain NLL (all objectives but ``ga``).
        beta: NPO's inverse temperature.
        kl_weight: weight of KL(pi_ref || pi) on the retain tokens; 0 turns it off.
        peft: a peft config or ``BitFit``; None trains every parameter.
        max_length: maximum tokens per record.
        learning_rate: AdamW learning rate (when no ``optimizer`` is configured).
        weight_decay: AdamW weight decay.
        export_merged: with a peft adapter, also export the merged model.
    """

    def __init__(
        self,
        model: Backbone,
        objective: Literal["ga", "grad_diff", "npo", "po"] = "grad_diff",
        gamma: float = 1.0,
        beta: float = 0.1,
        kl_weight: float = 0.0,
        peft: peft.PeftConfig | BitFit | None = None,
        max_length: int = 256,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        export_merged: bool = False,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(
                f"Invalid Unlearning arguments: objective={objective!r}; use one of "
                f"{sorted(OBJECTIVES)}."
            )
        if gamma < 0 or beta <= 0 or kl_weight < 0:
            raise ValueError(
                f"Invalid Unlearning arguments: gamma={gamma} and kl_weight={kl_weight} must "
                f"be non-negative and beta={beta} positive."
            )
        super().__init__(
            model,
            peft=peft,
            max_length=max_length,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            export_merged=export_merged,
        )
        # Recorded here as well, whatever the parent's save_hyperparameters collects.
        self.hparams.update(
            {"objective": objective, "gamma": gamma, "beta": beta, "kl_weight": kl_weight}
        )
        self.reference_model = None
        if objective == "npo" or kl_weight > 0:
            self.keep_reference()

    # ------------------------------------------------------------------ building blocks

    def tokens(self, records: list[PromptResponse]) -> TokenBatch:
        return self.featurize(records).to(self.device)

    def nll(self, records: list[PromptResponse]) -> Tensor:
        """Return the mean response-token NLL of ``records`` under the current weights."""
        batch = self.tokens(records)
        return mean_nll(self.token_logits(batch), batch.labels)

    def unlearning_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the configured objective's loss on ``batch`` and the terms it logs."""
        loss, terms = OBJECTIVES[self.hparams.objective](self, batch)
        if self.hparams.kl_weight > 0:
            retain = self.tokens(batch["retain"])
            kl = retain_kl(self.token_logits(retain), self.reference_logits(retain), retain.labels)
            loss = loss + self.hparams.kl_weight * kl
            terms["retain_kl"] = kl.detach()
        return loss, terms

    # ------------------------------------------------------------------ Lightning

    def training_step(self, batch: Batch, batch_index: int) -> Tensor:
        loss, terms = self.unlearning_loss(batch)
        size = len(batch["forget"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    def validation_step(self, batch: Batch, batch_index: int) -> None:
        size = len(batch["forget"])
        forget_nll, retain_nll = self.nll(batch["forget"]), self.nll(batch["retain"])
        self.log("val/forget_nll", forget_nll, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/retain_nll", retain_nll, prog_bar=True, batch_size=size, sync_dist=True)

    # Sophia's Hessian refresh: on the forget and retain records of the step together.

    def hessian_logits(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return super().hessian_logits(list(batch["forget"]) + list(batch["retain"]))

    def hessian_loss(self, batch: Batch) -> Tensor:
        return self.unlearning_loss(batch)[0]
