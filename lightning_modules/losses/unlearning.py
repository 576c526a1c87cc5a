"""Objectives of LLM unlearning, as small stateless functions on per-example quantities.

Notation: B examples, T tokens, V vocabulary. NLL is the mean next-token cross-entropy
over an example's response tokens; log pi(y|x) is the sum of the response tokens'
log-probabilities.

- Gradient ascent (GA): minimize -NLL(forget), i.e. make the forget answers unlikely.
- Gradient difference: -NLL(forget) + gamma * NLL(retain).
- NPO (Zhang et al., 2024, negative preference optimization): DPO with the forget answer
  as the only, dispreferred, response:
  (2 / beta) * mean(log(1 + (pi(y|x) / pi_ref(y|x))^beta)). Its gradient is that of
  log pi(y|x) scaled by 2 sigmoid(beta (log pi - log pi_ref)), which goes to zero as pi
  falls below pi_ref, whereas GA keeps pushing at full strength.
- PO: the NLL of refusal answers ("I don't know") to the forget questions, plus the
  retain term.
- KL on retain: mean over retain tokens of KL(pi_ref || pi), keeping the model's retain
  distribution near the reference.

These are a few lines each and depend on this project's batch layout, hence written
here; tests check each against values computed by hand.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.causal_lm import IGNORE_INDEX


def response_log_probs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Return (sum of response-token log-probabilities [B], response token counts [B]).

    Args:
        logits: [B, T, V]; position t predicts token t + 1.
        labels: [B, T] token ids, IGNORE_INDEX outside the response.
    """
    shifted_logits = logits[:, :-1].float()  # [B, T - 1, V]
    shifted_labels = labels[:, 1:]  # [B, T - 1]
    mask = shifted_labels != IGNORE_INDEX
    token_log_probs = (
        shifted_logits.log_softmax(dim=-1)
        .gather(-1, shifted_labels.clamp(min=0).unsqueeze(-1))
        .squeeze(-1)
    )  # [B, T - 1]
    return (token_log_probs * mask).sum(dim=1), mask.sum(dim=1)


def mean_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Return the mean next-token NLL over all response tokens of the batch (a scalar)."""
    log_probs, counts = response_log_probs(logits, labels)
    return -log_probs.sum() / counts.sum().clamp(min=1)


def gradient_ascent_loss(forget_nll: Tensor) -> Tensor:
    """Return -NLL(forget)."""
    return -forget_nll


def gradient_difference_loss(forget_nll: Tensor, retain_nll: Tensor, gamma: float) -> Tensor:
    """Return -NLL(forget) + gamma * NLL(retain)."""
    return -forget_nll + gamma * retain_nll


def npo_loss(policy_log_probs: Tensor, reference_log_probs: Tensor, beta: float) -> Tensor:
    """Return NPO's (2 / beta) * mean(softplus(beta * (log pi - log pi_ref))) over [B] sequences.

    softplus(z) = log(1 + e^z), so this equals (2 / beta) mean(log(1 + (pi / pi_ref)^beta)).
    """
    if beta <= 0:
        raise ValueError(f"npo_loss: beta={beta} must be positive.")
    return 2.0 / beta * F.softplus(beta * (policy_log_probs - reference_log_probs)).mean()


def retain_kl(policy_logits: Tensor, reference_logits: Tensor, labels: Tensor) -> Tensor:
    """Return the mean over response tokens of KL(pi_ref || pi) between next-token distributions.

    Args:
        policy_logits: [B, T, V].
        reference_logits: [B, T, V], without a graph.
        labels: [B, T]; only positions that predict a response token count.
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # [B, T - 1]
    policy = policy_logits[:, :-1].float().log_softmax(dim=-1)[mask]  # [N, V]
    reference = reference_logits[:, :-1].float().log_softmax(dim=-1)[mask]
    per_token = (reference.exp() * (reference - policy)).sum(dim=-1)  # [N]
    return per_token.mean() if len(per_token) else per_token.sum()
