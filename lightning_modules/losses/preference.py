"""Preference-optimization losses on sequence log-probabilities: DPO and its variants.

Notation: P pairs. For each pair, ``chosen`` and ``rejected`` are the log-ratios
log pi(y|x) - log pi_ref(y|x) of the preferred and the dispreferred response, and
h = chosen - rejected. Every loss returns the [P] per-pair values; the caller averages.

- ``sigmoid`` (DPO, Rafailov et al., 2023), with label smoothing eps (the conservative
  DPO of Mitchell, 2023, for labels flipped with probability eps):
  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
- ``ipo`` (Azar et al., 2023): (h - 1 / (2 beta))^2. It regresses the margin to a fixed
  target instead of pushing it without bound.
- ``hinge`` (SLiC, Zhao et al., 2023): max(0, 1 - beta h).

TRL and torchtune compute IPO from log-probabilities averaged over the response tokens
and the others from sums; :data:`LENGTH_NORMALIZED` records which, so that modules
follow them. The functions are one line each and take this project's tensors, hence
written here; tests check each against values computed by hand.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Return DPO's -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), [P]."""
    margin = beta * (chosen - rejected)
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def ipo_loss(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Return IPO's (h - 1 / (2 beta))^2, [P]; label smoothing does not apply."""
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def hinge_loss(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Return the hinge max(0, 1 - beta h), [P]; label smoothing does not apply."""
    return torch.relu(1 - beta * (chosen - rejected))


# loss name -> (chosen log-ratios, rejected log-ratios, beta, label smoothing) -> [P]
PREFERENCE_LOSSES: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
}
# Losses computed from per-token mean log-probabilities rather than sums.
LENGTH_NORMALIZED = frozenset({"ipo"})


def preference_diagnostics(
    chosen: Tensor,
    rejected: Tensor,
    beta: float,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
) -> dict[str, Tensor]:
    """Return the means over pairs that TRL and torchtune log, under their keys.

    ``rewards/chosen`` is beta * chosen (the implicit reward), ``rewards/margins`` the
    chosen minus the rejected reward, ``rewards/accuracies`` the share of pairs whose
    chosen reward is higher, ``logps/*`` the policy's log-probabilities.
    """
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy_chosen.mean(),
            "logps/rejected": policy_rejected.mean(),
        }
