"""Tests for SetF1 and CorefMetrics against hand-computed worked examples."""

import pytest
import torch

from lightning_modules.metrics import CorefMetrics, SetF1

COREF_KEYS = [
    f"{metric}/{quantity}"
    for metric in ("muc", "b3", "ceafe")
    for quantity in ("precision", "recall", "f1")
] + ["avg_f1"]

# The classic example with one document. Mention e is missing from the prediction, and h and i
# are spurious mentions that the gold clustering does not contain.
CLASSIC_GOLD = [["a", "b", "c"], ["d", "e", "f", "g"]]
CLASSIC_PREDICTED = [["a", "b"], ["c", "d"], ["f", "g", "h", "i"]]

# A second document that is predicted perfectly.
EASY_GOLD = [["x", "y"]]
EASY_PREDICTED = [["x", "y"]]


def score(predicted, gold):
    metric = CorefMetrics()
    metric.update(predicted, gold)
    return {name: value.item() for name, value in metric.compute().items()}


def test_coref_returns_all_keys():
    scores = score([CLASSIC_PREDICTED], [CLASSIC_GOLD])
    assert sorted(scores) == sorted(COREF_KEYS)


def test_muc_classic_example():
    # Recall, with each gold cluster partitioned by the predicted clusters:
    #   {a,b,c} -> {a,b}, {c}:          3 - 2 = 1 of 3 - 1 = 2 links
    #   {d,e,f,g} -> {d}, {e}, {f,g}:   4 - 3 = 1 of 4 - 1 = 3 links (e missing, own part)
    #   recall = (1 + 1) / (2 + 3) = 2/5
    # Precision, with each predicted cluster partitioned by the gold clusters:
    #   {a,b} -> {a,b}:                 2 - 1 = 1 of 1
    #   {c,d} -> {c}, {d}:              2 - 2 = 0 of 1
    #   {f,g,h,i} -> {f,g}, {h}, {i}:   4 - 3 = 1 of 3 (h, i spurious, own parts)
    #   precision = (1 + 0 + 1) / (1 + 1 + 3) = 2/5
    # F1 = 2/5.
    scores = score([CLASSIC_PREDICTED], [CLASSIC_GOLD])
    assert scores["muc/recall"] == pytest.approx(2 / 5)
    assert scores["muc/precision"] == pytest.approx(2 / 5)
    assert scores["muc/f1"] == pytest.approx(2 / 5)


def test_b3_classic_example():
    # Recall, per gold mention |K & R| / |K| for its gold cluster K and predicted cluster R:
    #   a, b: 2/3 each    c: 1/3    d: 1/4    e: 0 (missing)    f, g: 2/4 each
    #   sum = 4/3 + 1/3 + 1/4 + 1 = 35/12 over 7 gold mentions -> recall = 35/84 = 5/12
    # Precision, per predicted mention |K & R| / |R|:
    #   a, b: 2/2 each    c, d: 1/2 each    f, g: 2/4 each    h, i: 0 (spurious)
    #   sum = 2 + 1 + 1 = 4 over 8 predicted mentions -> precision = 1/2
    # F1 = 2 * (1/2) * (5/12) / (1/2 + 5/12) = (5/12) / (11/12) = 5/11.
    scores = score([CLASSIC_PREDICTED], [CLASSIC_GOLD])
    assert scores["b3/recall"] == pytest.approx(5 / 12)
    assert scores["b3/precision"] == pytest.approx(1 / 2)
    assert scores["b3/f1"] == pytest.approx(5 / 11)


def test_ceafe_classic_example():
    # phi4(K, R) = 2 |K & R| / (|K| + |R|):
    #               {a,b}       {c,d}       {f,g,h,i}
    #   {a,b,c}     4/5         2/5         0
    #   {d,e,f,g}   0           2/6         4/8
    # The best one-to-one alignment is {a,b,c}-{a,b} plus {d,e,f,g}-{f,g,h,i}:
    #   Phi = 4/5 + 1/2 = 13/10 (the alternatives give 2/5 + 1/2 and 4/5 + 1/3).
    # recall = Phi / 2 gold clusters = 13/20, precision = Phi / 3 predicted clusters = 13/30.
    # F1 = 2 * (13/20) * (13/30) / (13/20 + 13/30) = (338/600) / (65/60) = 13/25.
    scores = score([CLASSIC_PREDICTED], [CLASSIC_GOLD])
    assert scores["ceafe/recall"] == pytest.approx(13 / 20)
    assert scores["ceafe/precision"] == pytest.approx(13 / 30)
    assert scores["ceafe/f1"] == pytest.approx(13 / 25)


def test_avg_f1_classic_example():
    # Mean of the three F1 values computed above: (2/5 + 5/11 + 13/25) / 3.
    scores = score([CLASSIC_PREDICTED], [CLASSIC_GOLD])
    assert scores["avg_f1"] == pytest.approx((2 / 5 + 5 / 11 + 13 / 25) / 3)


def test_ceafe_missed_entity():
    # Gold {a}, {b,c}, {d,e,f} and predicted {a}, {d,e}: test case TC2 in
    # test/TestCases.README of conll/reference-coreference-scorers, whose expected CEAF-e
    # recall is 0.6 and precision 0.9. The alignment {a}-{a} and {d,e,f}-{d,e} gives
    # Phi = 1 + 2*2/(3+2) = 9/5, so recall = (9/5) / 3 = 3/5 and precision = (9/5) / 2 = 9/10.
    scores = score([[["a"], ["d", "e"]]], [[["a"], ["b", "c"], ["d", "e", "f"]]])
    assert scores["ceafe/recall"] == pytest.approx(3 / 5)
    assert scores["ceafe/precision"] == pytest.approx(9 / 10)


def test_missing_mention_convention():
    # Gold {a,b,c}, predicted {a,b}: c is missing from the prediction.
    # MUC recall: {a,b,c} -> {a,b}, {c}, so 3 - 2 = 1 of 2 links -> 1/2.
    # MUC precision: {a,b} -> {a,b}, so 1 of 1 link -> 1.
    # B3 recall: a, b get 2/3 each and c gets 0, so (4/3) / 3 = 4/9.
    # B3 precision: a, b get 2/2 each -> 1.
    scores = score([[["a", "b"]]], [[["a", "b", "c"]]])
    assert scores["muc/recall"] == pytest.approx(1 / 2)
    assert scores["muc/precision"] == pytest.approx(1.0)
    assert scores["b3/recall"] == pytest.approx(4 / 9)
    assert scores["b3/precision"] == pytest.approx(1.0)


def test_coref_perfect_prediction():
    scores = score([CLASSIC_GOLD, EASY_GOLD], [CLASSIC_GOLD, EASY_GOLD])
    for name in COREF_KEYS:
        assert scores[name] == pytest.approx(1.0), name


def test_coref_empty_prediction():
    # No predicted clusters: every precision denominator is 0 and every recall numerator is 0.
    scores = score([[]], [CLASSIC_GOLD])
    for name in COREF_KEYS:
        assert scores[name] == 0.0, name


def test_coref_empty_corpus():
    # No clusters on either side: every denominator is 0, and the scores are 0, not NaN.
    scores = score([[]], [[]])
    for name in COREF_KEYS:
        assert scores[name] == 0.0, name


def test_coref_sums_over_documents():
    # The classic document plus the perfect document {x,y}.
    # MUC:    recall (2 + 1) / (5 + 1) = 1/2, precision (2 + 1) / (5 + 1) = 1/2
    # B3:     recall (35/12 + 2) / (7 + 2) = 59/108, precision (4 + 2) / (8 + 2) = 3/5
    # CEAF-e: Phi = 13/10 + 1 = 23/10, recall (23/10) / 3 = 23/30, precision (23/10) / 4 = 23/40
    # The mean of per-document MUC recalls, (2/5 + 1) / 2 = 7/10, would differ.
    scores = score([CLASSIC_PREDICTED, EASY_PREDICTED], [CLASSIC_GOLD, EASY_GOLD])
    assert scores["muc/recall"] == pytest.approx(1 / 2)
    assert scores["muc/precision"] == pytest.approx(1 / 2)
    assert scores["b3/recall"] == pytest.approx(59 / 108)
    assert scores["b3/precision"] == pytest.approx(3 / 5)
    assert scores["ceafe/recall"] == pytest.approx(23 / 30)
    assert scores["ceafe/precision"] == pytest.approx(23 / 40)


def test_coref_batches_accumulate():
    metric = CorefMetrics()
    metric.update([CLASSIC_PREDICTED], [CLASSIC_GOLD])
    metric.update([EASY_PREDICTED], [EASY_GOLD])
    batched = {name: value.item() for name, value in metric.compute().items()}

    together = score([CLASSIC_PREDICTED, EASY_PREDICTED], [CLASSIC_GOLD, EASY_GOLD])
    for name in COREF_KEYS:
        assert batched[name] == pytest.approx(together[name]), name


def test_coref_merge_state():
    # Two instances stand in for two DDP processes. merge_state applies each state's
    # dist_reduce_fx, the same reduction that DDP sync applies.
    first = CorefMetrics()
    second = CorefMetrics()
    first.update([CLASSIC_PREDICTED], [CLASSIC_GOLD])
    second.update([EASY_PREDICTED], [EASY_GOLD])
    first.merge_state(second)
    merged = {name: value.item() for name, value in first.compute().items()}

    together = score([CLASSIC_PREDICTED, EASY_PREDICTED], [CLASSIC_GOLD, EASY_GOLD])
    for name in COREF_KEYS:
        assert merged[name] == pytest.approx(together[name]), name


def test_coref_tuple_mentions():
    # (start, end) spans behave like the letters above: the same clustering scores 1.
    gold = [[(0, 1), (5, 6)], [(2, 3), (8, 8), (10, 12)]]
    scores = score([gold], [gold])
    assert scores["avg_f1"] == pytest.approx(1.0)


def test_coref_drops_empty_clusters():
    with_empty = score([CLASSIC_PREDICTED + [[]]], [CLASSIC_GOLD])
    without_empty = score([CLASSIC_PREDICTED], [CLASSIC_GOLD])
    for name in COREF_KEYS:
        assert with_empty[name] == pytest.approx(without_empty[name]), name


def test_coref_rejects_shared_mention():
    metric = CorefMetrics()
    with pytest.raises(ValueError, match="more than one cluster"):
        metric.update([[["a", "b"], ["b", "c"]]], [CLASSIC_GOLD])


def test_coref_rejects_length_mismatch():
    metric = CorefMetrics()
    with pytest.raises(ValueError, match="documents"):
        metric.update([CLASSIC_PREDICTED, EASY_PREDICTED], [CLASSIC_GOLD])


# Two documents of entity tuples (start, end, type).
# Document 1: (0, 1, PER) is correct, and (3, 4, ORG) has the wrong end, so it is a false
# positive while the gold (3, 5, ORG) is a false negative.
# Document 2: (2, 2, LOC) is correct, and the gold (7, 8, PER) is missed.
# true positives = 2, predicted = 3, gold = 4.
# precision = 2/3, recall = 2/4 = 1/2, F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7.
ENTITY_PREDICTED = [{(0, 1, "PER"), (3, 4, "ORG")}, {(2, 2, "LOC")}]
ENTITY_GOLD = [{(0, 1, "PER"), (3, 5, "ORG")}, {(2, 2, "LOC"), (7, 8, "PER")}]


def test_set_f1_entity_example():
    metric = SetF1()
    metric.update(ENTITY_PREDICTED, ENTITY_GOLD)
    scores = metric.compute()
    assert scores["precision"].item() == pytest.approx(2 / 3)
    assert scores["recall"].item() == pytest.approx(1 / 2)
    assert scores["f1"].item() == pytest.approx(4 / 7)


def test_set_f1_counts_states():
    metric = SetF1()
    metric.update(ENTITY_PREDICTED, ENTITY_GOLD)
    assert metric.true_positives.item() == 2
    assert metric.predicted.item() == 3
    assert metric.gold.item() == 4


def test_set_f1_returns_float():
    metric = SetF1()
    metric.update(ENTITY_PREDICTED, ENTITY_GOLD)
    assert metric.compute()["f1"].dtype == torch.float32


def test_set_f1_relation_type_mismatch():
    # A relation whose arguments match but whose type differs is not a true positive.
    metric = SetF1()
    metric.update([{(0, 1, 4, 5, "works_for")}], [{(0, 1, 4, 5, "located_in")}])
    assert metric.compute()["f1"].item() == 0.0


def test_set_f1_empty_prediction():
    metric = SetF1()
    metric.update([set(), set()], ENTITY_GOLD)
    scores = metric.compute()
    assert scores["precision"].item() == 0.0
    assert scores["recall"].item() == 0.0
    assert scores["f1"].item() == 0.0


def test_set_f1_merge_state():
    first = SetF1()
    second = SetF1()
    first.update(ENTITY_PREDICTED[:1], ENTITY_GOLD[:1])
    second.update(ENTITY_PREDICTED[1:], ENTITY_GOLD[1:])
    first.merge_state(second)
    assert first.compute()["f1"].item() == pytest.approx(4 / 7)


def test_set_f1_rejects_length_mismatch():
    metric = SetF1()
    with pytest.raises(ValueError, match="documents"):
        metric.update(ENTITY_PREDICTED, ENTITY_GOLD[:1])
