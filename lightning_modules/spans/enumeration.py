"""Span enumeration, span representations, pruning and pair scoring, all batched.

Notation: B documents, W words (padded), M maximum span width in words, S = W * M
candidate spans per document, D word vector size, G span vector size, P kept spans,
K antecedents per span, H hidden size.

Span ``s`` of a document starts at word ``s // M`` and is ``s % M + 1`` words long, so
a gold span ``(start, end)`` has index ``start * M + end - start``: lookups are
arithmetic, never a search over spans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SpanCandidates:
    """Every span of up to ``max_width`` words that stays inside one sentence."""

    starts: Tensor  # [B, S] first word
    ends: Tensor  # [B, S] last word (inclusive)
    mask: Tensor  # [B, S] bool, False for spans that cross a sentence or run past the document
    max_width: int


def span_index(start: int, end: int, max_width: int) -> int:
    """Index of span ``(start, end)`` in :class:`SpanCandidates` (end inclusive)."""
    return start * max_width + end - start


def enumerate_spans(sentence_ids: Tensor, max_width: int) -> SpanCandidates:
    """List the candidate spans of each document.

    Args:
        sentence_ids: [B, W] sentence index of each word, -1 at padding.
        max_width: maximum span length in words.
    """
    batch_size, num_words = sentence_ids.shape
    device = sentence_ids.device
    starts = torch.arange(num_words, device=device).repeat_interleave(max_width)  # [S]
    ends = starts + torch.arange(max_width, device=device).repeat(num_words)  # [S]
    inside = ends < num_words
    clamped_ends = ends.clamp(max=num_words - 1)
    start_sentence = sentence_ids[:, starts]  # [B, S]
    end_sentence = sentence_ids[:, clamped_ends]  # [B, S]
    mask = inside & (start_sentence == end_sentence) & (start_sentence >= 0)
    return SpanCandidates(
        starts.expand(batch_size, -1), clamped_ends.expand(batch_size, -1), mask, max_width
    )


def batched_gather(values: Tensor, indices: Tensor) -> Tensor:
    """``values[b, indices[b, ...]]`` for values [B, X, ...] and integer indices [B, ...]."""
    batch_size = values.shape[0]
    flat_indices = indices.reshape(batch_size, -1)  # [B, I]
    trailing = values.shape[2:]
    expanded = flat_indices.reshape(*flat_indices.shape, *([1] * len(trailing))).expand(
        *flat_indices.shape, *trailing
    )
    gathered = values.gather(1, expanded)  # [B, I, ...]
    return gathered.reshape(*indices.shape, *trailing)


class SpanRepresentation(nn.Module):
    """g = [x_start, x_end, attention-weighted sum of x over the span, width embedding].

    The head-finding attention follows Lee et al. (2017), "End-to-end Neural Coreference
    Resolution", section 4: a softmax over the span's words of a learned linear score.

    All spans that start at word w read their words from the same window x[w : w + M].
    So the attention-weighted sums of all S spans are one batched product of
    [B, W, M (width), M (offset)] weights with [B, W, M (offset), D] windows, and no
    [B, S, M, D] tensor of gathered words is built. :meth:`project` goes one step
    further for the first linear layer of a scorer applied to every span: it projects
    the words first and combines the projections, which equals ``linear(g)`` exactly.
    """

    def __init__(self, word_dim: int, max_width: int, width_dim: int):
        super().__init__()
        self.max_width = max_width
        self.word_dim = word_dim
        self.attention = nn.Linear(word_dim, 1)
        self.width_embedding = nn.Embedding(max_width, width_dim)
        self.output_dim = 3 * word_dim + width_dim

    def _windows(self, values: Tensor) -> Tensor:
        """[B, W, C] -> [B, W, M, C], row w holding values[w : w + M] (zeros past the end)."""
        padded = F.pad(values, (0, 0, 0, self.max_width - 1))
        return padded.unfold(1, self.max_width, 1).transpose(2, 3)

    def attention_weights(self, words: Tensor) -> Tensor:
        """Softmax weights [B, W, M (width), M (offset)] of each span's words."""
        scores = self.attention(words)  # [B, W, 1]
        windows = self._windows(scores).squeeze(-1)  # [B, W, M]
        offsets = torch.arange(self.max_width, device=words.device)
        inside = offsets.unsqueeze(0) <= offsets.unsqueeze(1)  # [M (width), M (offset)]
        logits = windows.unsqueeze(2).masked_fill(~inside, float("-inf"))  # [B, W, M, M]
        return logits.softmax(dim=-1)

    def forward(
        self, words: Tensor, spans: SpanCandidates, indices: Tensor | None = None
    ) -> Tensor:
        """Return span vectors [B, S, G] for word vectors [B, W, D], or [B, P, G] at ``indices``."""
        batch_size, num_words, word_dim = words.shape
        weights = self.attention_weights(words)  # [B, W, M, M]
        windows = self._windows(words)  # [B, W, M, D]
        if indices is None:
            heads = torch.einsum("bwkm,bwmd->bwkd", weights, windows).reshape(
                batch_size, -1, word_dim
            )
            starts, ends = spans.starts, spans.ends  # [B, S]
        else:
            starts = batched_gather(spans.starts, indices)  # [B, P]
            ends = batched_gather(spans.ends, indices)  # [B, P]
            span_weights = batched_gather(
                weights.reshape(batch_size, -1, self.max_width), indices
            )  # [B, P, M]
            span_windows = batched_gather(windows, starts)  # [B, P, M, D]
            heads = torch.einsum("bpm,bpmd->bpd", span_weights, span_windows)
        widths = self.width_embedding(ends - starts)
        return torch.cat(
            [batched_gather(words, starts), batched_gather(words, ends), heads, widths], dim=-1
        )

    def project(self, words: Tensor, spans: SpanCandidates, linear: nn.Linear) -> Tensor:
        """Return ``linear(g)`` for every span, [B, S, out], without building g.

        ``linear`` acts on g = [x_start, x_end, head, width] through four column blocks,
        W g = W_s x_start + W_e x_end + W_h head + W_w width, and W_h head is the
        attention-weighted sum of W_h x over the span. So the words are projected once,
        [B, W, 3 * out], and the span results are sums of those projections.
        """
        batch_size = words.shape[0]
        d = self.word_dim
        weight = linear.weight  # [out, G]
        start_weight, end_weight, head_weight, width_weight = weight.split(
            [d, d, d, weight.shape[1] - 3 * d], dim=1
        )
        projected = words @ torch.cat([start_weight, end_weight, head_weight]).T  # [B, W, 3 * out]
        start_part, end_part, head_part = projected.chunk(3, dim=-1)  # each [B, W, out]

        per_start = start_part.unsqueeze(2)  # [B, W, 1, out], the same for every width
        per_end = self._windows(end_part)  # [B, W, M, out], span (w, k) ends at w + k
        per_head = torch.einsum(
            "bwkm,bwmo->bwko", self.attention_weights(words), self._windows(head_part)
        )
        per_width = self.width_embedding.weight @ width_weight.T  # [M, out]
        result = per_start + per_end + per_head + per_width
        if linear.bias is not None:
            result = result + linear.bias
        return result.reshape(batch_size, -1, weight.shape[0])  # [B, S, out]


def prune_spans(scores: Tensor, mask: Tensor, num_keep: Tensor) -> tuple[Tensor, Tensor]:
    """Keep each document's ``num_keep`` highest-scoring spans, in document order.

    Args:
        scores: [B, S] mention scores.
        mask: [B, S] bool, candidate spans.
        num_keep: [B] spans to keep per document.

    Returns:
        indices [B, P] into the S candidates, sorted ascending (so by start, then end),
        and keep [B, P] bool, False where a document keeps fewer than P spans.
    """
    num_spans = scores.shape[1]
    num_keep = torch.minimum(num_keep, mask.sum(dim=1))
    budget = max(int(num_keep.max()), 1)
    top = scores.masked_fill(~mask, float("-inf")).topk(budget, dim=1).indices  # [B, P]
    keep = torch.arange(budget, device=scores.device) < num_keep.unsqueeze(1)  # [B, P]
    # Sort kept spans by index; dropped slots are pushed past S and mapped back after.
    order_key = torch.where(keep, top, top + num_spans).sort(dim=1).values
    return order_key % num_spans, order_key < num_spans


class FeedForward(nn.Sequential):
    """Linear-ReLU-dropout layers, then a linear output layer."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int = 2,
        dropout: float = 0.0,
    ):
        layers: list[nn.Module] = []
        size = input_dim
        for _ in range(num_layers):
            layers += [nn.Linear(size, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
            size = hidden_dim
        layers.append(nn.Linear(size, output_dim))
        super().__init__(*layers)


class PairScorer(nn.Module):
    """Feed-forward scores of span pairs from [g_i, g_j, g_i * g_j].

    The first layer is applied term by term, W [g_i; g_j; g_i * g_j] = W_1 g_i + W_2 g_j
    + W_3 (g_i * g_j), which equals one linear layer on the concatenation without
    building the [..., 3G] concatenated tensor. :meth:`forward` lets ``source``
    broadcast against ``target`` (a span against its K antecedents); :meth:`score_pairs`
    takes pairs as indices and applies W_1 and W_2 once per span.
    """

    def __init__(self, span_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.0):
        super().__init__()
        self.source = nn.Linear(span_dim, hidden_dim)
        self.target = nn.Linear(span_dim, hidden_dim, bias=False)
        self.product = nn.Linear(span_dim, hidden_dim, bias=False)
        self.rest = nn.Sequential(
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        """Score pairs; ``source`` [..., G] and ``target`` [..., G] broadcast against each other."""
        hidden = self.source(source) + self.target(target) + self.product(source * target)
        return self.rest(hidden)

    def score_pairs(
        self, vectors: Tensor, document: Tensor, source: Tensor, target: Tensor
    ) -> Tensor:
        """Score pairs given as indices into ``vectors`` [B, P, G]; returns [N, out].

        Equals ``forward(vectors[document, source], vectors[document, target])``, but
        W_1 g and W_2 g are computed once per span and gathered, not once per pair.
        """
        source_part = self.source(vectors)[document, source]  # [N, H]
        target_part = self.target(vectors)[document, target]  # [N, H]
        product_part = self.product(vectors[document, source] * vectors[document, target])  # [N, H]
        return self.rest(source_part + target_part + product_part)
