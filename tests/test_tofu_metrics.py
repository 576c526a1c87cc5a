"""TOFU metrics against worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_modules.metrics.tofu import (
    answer_probability,
    forget_quality,
    forget_truth_ratio,
    model_utility,
    relative_answer_probability,
    rouge_l_recall,
    truth_ratios,
    utility_truth_ratio,
)


def test_answer_probability() -> None:
    losses = [math.log(2), math.log(4)]  # normalized probabilities 1/2 and 1/4
    assert answer_probability(losses) == pytest.approx(0.375)


def test_relative_answer_probability() -> None:
    # True 1/2 against perturbed 1/4 and 1/4: share 1/2. True 1/4 against 1/2, 1/4: 1/4.
    true = [math.log(2), math.log(4)]
    perturbed = [[math.log(4), math.log(4)], [math.log(2), math.log(4)]]
    assert relative_answer_probability(true, perturbed) == pytest.approx((0.5 + 0.25) / 2)


def test_truth_ratio_and_its_two_reports() -> None:
    # Question 1: paraphrased probability 1/2, perturbed 1/4 and 1/16 (geometric mean 1/8):
    # R = (1/2) / (1/8) = 4. Question 2: paraphrased 1/8, perturbed 1/2 and 1/2: R = 1/4.
    paraphrased = [math.log(2), math.log(8)]
    perturbed = [[math.log(4), math.log(16)], [math.log(2), math.log(2)]]
    ratios = truth_ratios(paraphrased, perturbed)
    np.testing.assert_allclose(ratios, [4.0, 0.25])
    assert forget_truth_ratio(ratios) == pytest.approx((0.25 + 0.25) / 2)
    # max(0, 1 - 1/4) = 0.75 and max(0, 1 - 4) = 0.
    assert utility_truth_ratio(ratios) == pytest.approx(0.375)


def test_rouge_l_recall_worked_example() -> None:
    # Longest common subsequence "the cat on mat" = 4 of the reference's 6 words.
    recall = rouge_l_recall(["the cat sat on a mat"], ["the cat lay on the mat"])
    assert recall == pytest.approx(4 / 6)
    assert rouge_l_recall(["x", "the cat"], ["the cat", "the cat"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="as many predictions"):
        rouge_l_recall(["a"], [])


def test_forget_quality_is_the_ks_p_value() -> None:
    same = np.linspace(0.1, 1.0, 20)
    assert forget_quality(same, same) == pytest.approx(1.0)
    # Disjoint samples of 20 each: statistic 1, exact two-sided p = 2 / C(40, 20).
    assert forget_quality(same, same + 10) == pytest.approx(2 / math.comb(40, 20), rel=1e-6)


def test_model_utility_harmonic_mean() -> None:
    scores = {
        name: {"probability": 0.5, "rouge": 0.5, "truth_ratio": 0.5}
        for name in ("retain", "real_authors", "world_facts")
    }
    assert model_utility(scores) == pytest.approx(0.5)
    scores["world_facts"]["rouge"] = 0.25
    # Nine values, eight of 1/2 and one of 1/4: 9 / (8 * 2 + 4).
    assert model_utility(scores) == pytest.approx(9 / 20)
    with pytest.raises(ValueError, match="real_authors"):
        model_utility({"retain": scores["retain"]})
