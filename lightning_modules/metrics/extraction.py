"""Information-extraction metrics: micro set F1 and the CoNLL coreference scores.

These are written here because torchmetrics (checked with 1.9) has no coreference metrics,
and the CoNLL reference scorer is a Perl program that scores key and response files, not a
``Metric`` whose states sum correctly across DDP processes.

Every state is a scalar with ``dist_reduce_fx="sum"``, so a synced metric equals one metric
that saw every document the processes saw. NOTE: Lightning's distributed sampler pads the
last batch by repeating documents, so under DDP a few documents can count twice.

Notation for one document: K ranges over the key (gold) clusters, R over the response
(predicted) clusters, and ``&`` is set intersection.

- MUC (Vilain et al., 1995, "A model-theoretic coreference scoring scheme", MUC-6):
  recall = sum_K (|K| - |p(K)|) / sum_K (|K| - 1), where p(K) is the partition of K induced
  by the response clusters. Precision swaps the roles of key and response.
- B-cubed (Bagga and Baldwin, 1998, "Algorithms for scoring coreference chains"):
  recall = sum_K sum_R |K & R|^2 / |K|, divided by the number of key mentions.
  Precision swaps the roles of key and response.
- CEAF-e (Luo, 2005, "On coreference resolution performance metrics", HLT/EMNLP):
  phi4(K, R) = 2 |K & R| / (|K| + |R|). Phi is the maximum of sum phi4 over one-to-one
  alignments of key and response clusters. Recall = Phi / number of key clusters,
  precision = Phi / number of response clusters.
- CoNLL score (``avg_f1``): the mean of the MUC, B-cubed and CEAF-e F1.

Corpus scores sum each numerator and each denominator over documents and divide once at the
end, as the CoNLL-2011/2012 reference scorer v8.01 does (Pradhan et al., 2014, "Scoring
coreference partitions of predicted mentions: a reference implementation"). They are not
means of per-document scores.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric

Clustering = Sequence[Collection[Hashable]]

_COREF_METRIC_NAMES = ("muc", "b3", "ceafe")


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Return numerator / denominator as float64, or 0 where the denominator is 0."""
    numerator = numerator.double()
    denominator = denominator.double()
    safe_denominator = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe_denominator)


def _precision_recall_f1(
    precision_numerator: torch.Tensor,
    precision_denominator: torch.Tensor,
    recall_numerator: torch.Tensor,
    recall_denominator: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return float32 precision, recall and F1, each 0 where its denominator is 0."""
    precision = _divide(precision_numerator, precision_denominator)
    recall = _divide(recall_numerator, recall_denominator)
    f1 = _divide(2 * precision * recall, precision + recall)
    return precision.float(), recall.float(), f1.float()


def _check_document_counts(predicted: Sequence[Any], gold: Sequence[Any]) -> None:
    if len(predicted) != len(gold):
        raise ValueError(
            f"predicted has {len(predicted)} documents but gold has {len(gold)}. "
            "Pass exactly one entry per document in both."
        )


class SetF1(Metric):
    """Micro precision, recall and F1 between predicted and gold sets of hashable items.

    Each document contributes one predicted and one gold collection, for example entity
    tuples ``(start, end, type)`` or relation tuples ``(start1, end1, start2, end2, type)``.
    An item is a true positive only if the identical item is in the gold set of the same
    document. Duplicate items within one collection count once.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("true_positives", "predicted", "gold"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, predicted: Sequence[Collection[Hashable]], gold: Sequence[Collection[Hashable]]
    ) -> None:
        """Add the counts of a batch that contains one predicted and one gold set per document."""
        _check_document_counts(predicted, gold)
        true_positives = 0
        predicted_count = 0
        gold_count = 0
        for predicted_items, gold_items in zip(predicted, gold, strict=True):
            predicted_set = set(predicted_items)
            gold_set = set(gold_items)
            true_positives += len(predicted_set & gold_set)
            predicted_count += len(predicted_set)
            gold_count += len(gold_set)

        self.true_positives += true_positives
        self.predicted += predicted_count
        self.gold += gold_count

    def compute(self) -> dict[str, torch.Tensor]:
        """Return ``precision``, ``recall`` and ``f1`` as float tensors."""
        precision, recall, f1 = _precision_recall_f1(
            self.true_positives, self.predicted, self.true_positives, self.gold
        )
        return {"precision": precision, "recall": recall, "f1": f1}


def _to_clusters(clustering: Clustering, side: str, document_index: int) -> list[frozenset]:
    """Convert one document's clusters to frozensets, dropping empty clusters.

    Raises ValueError if a mention belongs to more than one cluster of the same clustering.
    """
    clusters: list[frozenset] = []
    seen: set[Hashable] = set()
    for cluster in clustering:
        mentions = frozenset(cluster)
        shared = seen & mentions
        if shared:
            raise ValueError(
                f"{side} document {document_index}: mention {next(iter(shared))!r} is in more "
                "than one cluster. Merge those clusters or keep the mention in only one of them."
            )
        seen |= mentions
        if mentions:
            clusters.append(mentions)
    return clusters


def _muc_counts(key: list[frozenset], response: list[frozenset]) -> tuple[int, int]:
    """Return the MUC recall numerator and denominator. Swapped arguments give precision."""
    response_index = {
        mention: index for index, cluster in enumerate(response) for mention in cluster
    }
    numerator = 0
    denominator = 0
    for cluster in key:
        # A key mention absent from the response is a response singleton, so it is a part
        # of its own in p(K).
        found_parts = {response_index[mention] for mention in cluster if mention in response_index}
        missing_count = sum(1 for mention in cluster if mention not in response_index)
        numerator += len(cluster) - (len(found_parts) + missing_count)
        denominator += len(cluster) - 1
    return numerator, denominator


def _b_cubed_counts(key: list[frozenset], response: list[frozenset]) -> tuple[float, int]:
    """Return the B-cubed recall numerator and denominator. Swapped arguments give precision."""
    numerator = sum(len(k & r) ** 2 / len(k) for k in key for r in response)
    denominator = sum(len(k) for k in key)
    return numerator, denominator


def _ceafe_similarity(key: list[frozenset], response: list[frozenset]) -> float:
    """Return Phi, the phi4 similarity summed over the optimal one-to-one cluster alignment."""
    if not key or not response:
        return 0.0
    similarity = np.array(
        [[2 * len(k & r) / (len(k) + len(r)) for r in response] for k in key], dtype=np.float64
    )
    rows, columns = linear_sum_assignment(similarity, maximize=True)
    return float(similarity[rows, columns].sum())


def _document_counts(key: list[frozenset], response: list[frozenset]) -> dict[str, float]:
    """Return every numerator and denominator of one document, keyed by state name."""
    phi = _ceafe_similarity(key, response)
    fractions = {
        "muc_recall": _muc_counts(key, response),
        "muc_precision": _muc_counts(response, key),
        "b3_recall": _b_cubed_counts(key, response),
        "b3_precision": _b_cubed_counts(response, key),
        "ceafe_recall": (phi, len(key)),
        "ceafe_precision": (phi, len(response)),
    }
    counts: dict[str, float] = {}
    for quantity, (numerator, denominator) in fractions.items():
        counts[f"{quantity}_numerator"] = numerator
        counts[f"{quantity}_denominator"] = denominator
    return counts


class CorefMetrics(Metric):
    """MUC, B-cubed and CEAF-e precision, recall and F1, plus their mean F1 (the CoNLL score).

    Each document is a list of clusters, and each cluster is a collection of hashable
    mentions such as ``(start, end)``. Mentions are matched exactly. Empty clusters are
    dropped. A mention in two clusters of the same clustering raises ValueError, whereas the
    reference scorer keeps only the first occurrence of a repeated response mention.

    Mentions present in only one clustering (missed or spurious mentions) follow the CoNLL
    reference scorer v8.01. MUC treats such a mention as a singleton cluster of the other
    clustering, so it splits the partition p(K) but adds no link. B-cubed gives such a
    mention 0 credit but keeps it in the denominator, and CEAF-e needs no rule because phi4
    only counts shared mentions.

    NOTE: the sums are float64 states, which Apple MPS devices do not support.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for metric_name in _COREF_METRIC_NAMES:
            for quantity in ("recall", "precision"):
                for part in ("numerator", "denominator"):
                    self.add_state(
                        f"{metric_name}_{quantity}_{part}",
                        default=torch.tensor(0.0, dtype=torch.float64),
                        dist_reduce_fx="sum",
                    )

    def update(self, predicted: Sequence[Clustering], gold: Sequence[Clustering]) -> None:
        """Add the numerators and denominators of a batch of documents."""
        _check_document_counts(predicted, gold)
        batch_counts: dict[str, float] = {}
        for document_index, (predicted_clusters, gold_clusters) in enumerate(
            zip(predicted, gold, strict=True)
        ):
            response = _to_clusters(predicted_clusters, "predicted", document_index)
            key = _to_clusters(gold_clusters, "gold", document_index)
            for name, value in _document_counts(key, response).items():
                batch_counts[name] = batch_counts.get(name, 0.0) + value

        for name, value in batch_counts.items():
            setattr(self, name, getattr(self, name) + value)

    def compute(self) -> dict[str, torch.Tensor]:
        """Return ``{metric}/precision``, ``{metric}/recall``, ``{metric}/f1`` and ``avg_f1``."""
        scores: dict[str, torch.Tensor] = {}
        for metric_name in _COREF_METRIC_NAMES:
            precision, recall, f1 = _precision_recall_f1(
                getattr(self, f"{metric_name}_precision_numerator"),
                getattr(self, f"{metric_name}_precision_denominator"),
                getattr(self, f"{metric_name}_recall_numerator"),
                getattr(self, f"{metric_name}_recall_denominator"),
            )
            scores[f"{metric_name}/precision"] = precision
            scores[f"{metric_name}/recall"] = recall
            scores[f"{metric_name}/f1"] = f1

        f1_sum = sum(scores[f"{metric_name}/f1"] for metric_name in _COREF_METRIC_NAMES)
        scores["avg_f1"] = f1_sum / len(_COREF_METRIC_NAMES)
        return scores
