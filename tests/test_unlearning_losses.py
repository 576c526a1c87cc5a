"""Unlearning objectives against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.causal_lm import IGNORE_INDEX, response_token_loss
from lightning_modules.losses.unlearning import (
    gradient_ascent_loss,
    gradient_difference_loss,
    mean_nll,
    npo_loss,
    response_log_probs,
    retain_kl,
)

# One example, vocabulary of 2, three positions; the response is tokens 1 and 2.
LOGITS = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [0.0, 0.0]]])
LABELS = torch.tensor([[IGNORE_INDEX, 1, 0]])


def test_response_log_probs_by_hand() -> None:
    log_probs, counts = response_log_probs(LOGITS, LABELS)
    # Position 0 predicts token 1 with p = 3/4; position 1 predicts token 0 with p = 4/5.
    assert log_probs.item() == pytest.approx(math.log(0.75) + math.log(0.8))
    assert counts.tolist() == [2]


def test_mean_nll_matches_fine_tuning_loss() -> None:
    expected = -(math.log(0.75) + math.log(0.8)) / 2
    assert mean_nll(LOGITS, LABELS).item() == pytest.approx(expected)
    assert mean_nll(LOGITS, LABELS).item() == pytest.approx(
        response_token_loss(LOGITS, LABELS).item()
    )


def test_gradient_ascent_and_difference() -> None:
    forget, retain = torch.tensor(2.0), torch.tensor(0.5)
    assert gradient_ascent_loss(forget).item() == -2.0
    assert gradient_difference_loss(forget, retain, gamma=3.0).item() == pytest.approx(-0.5)


def test_npo_by_hand() -> None:
    policy = torch.tensor([-2.0, -1.0])
    reference = torch.tensor([-1.0, -1.0])
    # beta 0.5: (2 / 0.5) * mean(log(1 + e^(-0.5)), log(1 + e^0)) = 4 * mean(0.4741, 0.6931).
    expected = 4 * (math.log1p(math.exp(-0.5)) + math.log(2.0)) / 2
    assert npo_loss(policy, reference, beta=0.5).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="beta=0"):
        npo_loss(policy, reference, beta=0.0)


def test_npo_gradient_is_scaled_log_probability_gradient() -> None:
    policy = torch.tensor([-3.0], requires_grad=True)
    npo_loss(policy, torch.tensor([-1.0]), beta=2.0).backward()
    # d/d log pi = 2 sigmoid(beta (log pi - log pi_ref)) = 2 sigmoid(-4).
    assert policy.grad.item() == pytest.approx(2 * torch.sigmoid(torch.tensor(-4.0)).item())


def test_retain_kl_by_hand() -> None:
    reference = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]]])
    policy = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [0.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 1]])  # positions 0 and 1 count, not 2
    # Position 0: KL([1/2, 1/2] || [1/4, 3/4]); position 1: KL([1/4, 3/4] || [1/2, 1/2]).
    first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    second = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert retain_kl(policy, reference, labels).item() == pytest.approx((first + second) / 2)
    assert retain_kl(reference, reference, labels).item() == pytest.approx(0.0, abs=1e-7)
