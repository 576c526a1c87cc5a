"""Preference pairs within prompt groups, and pairwise accuracy over them.

A reward model scores several images (or responses) per prompt, each with a rating where
higher is better. Every ordered pair (i, j) of the same prompt with rating_i > rating_j
is a preference "i over j". Pairs with equal ratings are ties and are skipped, as
ImageReward does; a NaN rating (no rating for that aspect) forms no pair.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


def preference_pairs(ratings: Tensor, group: Tensor) -> Tensor:
    """Return the [N, N] boolean matrix with True where item i is preferred over item j.

    Args:
        ratings: [N] ratings, higher is better, NaN for unrated items.
        group: [N] prompt index of each item; only items of the same prompt are compared.
    """
    same_prompt = group.unsqueeze(1) == group.unsqueeze(0)  # [N, N]
    # Comparisons with NaN are False, so unrated items form no pair.
    return same_prompt & (ratings.unsqueeze(1) > ratings.unsqueeze(0))


def pairwise_correct(scores: Tensor, preferred: Tensor) -> tuple[Tensor, Tensor]:
    """Count the pairs that ``scores`` orders like ``preferred``; an exact tie counts half.

    Returns (correct, total), both float64 scalars.
    """
    difference = scores.unsqueeze(1) - scores.unsqueeze(0)  # [N, N], s_i - s_j
    correct = (difference > 0)[preferred].sum() + 0.5 * (difference == 0)[preferred].sum()
    return correct.double(), preferred.sum().double()


class PairwiseAccuracy(Metric):
    """Fraction of preference pairs that the scores order correctly (ties in score: half).

    States are sums, so the metric is exact under DDP.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, scores: Tensor, preferred: Tensor) -> None:
        """Add the pairs of one batch: ``scores`` [N], ``preferred`` [N, N] from :func:`preference_pairs`."""
        correct, total = pairwise_correct(scores.detach(), preferred)
        self.correct += correct
        self.total += total

    def compute(self) -> Tensor:
        """Return the accuracy, NaN when no pair was seen."""
        if self.total == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.correct / self.total


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..n of ``values`` [n], with tied values sharing the mean of their ranks."""
    below = (values.unsqueeze(0) < values.unsqueeze(1)).sum(dim=1)
    equal = (values.unsqueeze(0) == values.unsqueeze(1)).sum(dim=1)
    return below.double() + (equal.double() + 1) / 2


def spearman(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation of two [n] tensors (Pearson of average ranks); NaN if constant."""
    ranks_first = _average_ranks(first)
    ranks_second = _average_ranks(second)
    centered_first = ranks_first - ranks_first.mean()
    centered_second = ranks_second - ranks_second.mean()
    denominator = centered_first.norm() * centered_second.norm()
    if denominator == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (centered_first * centered_second).sum() / denominator


class PromptSpearman(Metric):
    """Spearman correlation of scores with ratings within each prompt, averaged over prompts.

    Ratings of different prompts are not comparable, because a rank 1 is the best of its
    own prompt only. So the correlation is taken per prompt, over its rated items.
    Prompts with fewer than 2 rated items, or with constant scores or ratings, are skipped.
    States are sums, so the metric is exact under DDP.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, scores: Tensor, ratings: Tensor, group: Tensor) -> None:
        """Add the prompts of one batch: ``scores``, ``ratings`` (NaN: unrated), ``group``, all [N]."""
        scores = scores.detach().double()
        for prompt in torch.unique(group):
            rated = (group == prompt) & ~torch.isnan(ratings)
            if rated.sum() < 2:
                continue
            correlation = spearman(scores[rated], ratings[rated].double())
            if not torch.isnan(correlation):
                self.total += correlation
                self.count += 1

    def compute(self) -> Tensor:
        """Return the mean per-prompt correlation, NaN when no prompt qualified."""
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total / self.count
