"""Tests for the synthetic SciERC-style demo corpus."""

from __future__ import annotations

import json

import pytest

from datamodules.scierc_demo import SPLIT_SIZES, demo_documents, write_demo_corpus

ENTITY_TYPES = {"Task", "Method", "Metric", "Material", "OtherScientificTerm", "Generic"}
RELATION_TYPES = {
    "USED-FOR",
    "FEATURE-OF",
    "HYPONYM-OF",
    "PART-OF",
    "COMPARE",
    "CONJUNCTION",
    "EVALUATE-FOR",
}
# No temporary file may remain next to the written corpus.
EXPECTED_FILES = ["dev.json", "test.json", "train.json"]


@pytest.fixture(scope="module", params=sorted(SPLIT_SIZES))
def split_documents(request):
    return request.param, demo_documents(request.param)


def sentence_bounds(document):
    """Return the inclusive document-level word range of each sentence."""
    bounds = []
    start = 0
    for sentence in document["sentences"]:
        bounds.append((start, start + len(sentence) - 1))
        start += len(sentence)
    return bounds


def test_split_sizes(split_documents):
    split, documents = split_documents
    assert len(documents) == SPLIT_SIZES[split]
    assert len({document["doc_key"] for document in documents}) == len(documents)


def test_same_seed_same_documents():
    assert demo_documents("train", seed=3) == demo_documents("train", seed=3)
    assert demo_documents("dev", seed=3) == demo_documents("dev", seed=3)


def test_different_seed_different_documents():
    assert demo_documents("train", seed=0) != demo_documents("train", seed=1)


def test_splits_differ():
    dev_sentences = [document["sentences"] for document in demo_documents("dev")]
    test_sentences = [document["sentences"] for document in demo_documents("test")]
    assert dev_sentences != test_sentences


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="validation"):
        demo_documents("validation")
    with pytest.raises(ValueError, match="dev"):
        demo_documents("validation")


def test_document_fields(split_documents):
    _, documents = split_documents
    for document in documents:
        assert set(document) == {"doc_key", "sentences", "ner", "relations", "clusters"}
        assert 3 <= len(document["sentences"]) <= 6
        assert len(document["ner"]) == len(document["sentences"])
        assert len(document["relations"]) == len(document["sentences"])
        for sentence in document["sentences"]:
            assert all(isinstance(word, str) and word for word in sentence)


def test_entity_spans_inside_sentence(split_documents):
    _, documents = split_documents
    for document in documents:
        for (first, last), entities in zip(sentence_bounds(document), document["ner"], strict=True):
            for start, end, entity_type in entities:
                assert start <= end, (document["doc_key"], start, end)
                assert first <= start, (document["doc_key"], start, first)
                assert end <= last, (document["doc_key"], end, last)
                assert entity_type in ENTITY_TYPES


def test_entity_spans_do_not_overlap(split_documents):
    _, documents = split_documents
    for document in documents:
        spans = sorted((start, end) for entities in document["ner"] for start, end, _ in entities)
        for (_, previous_end), (next_start, _) in zip(spans, spans[1:], strict=False):
            assert previous_end < next_start, document["doc_key"]


def test_sentences_contain_non_entity_words(split_documents):
    _, documents = split_documents
    for document in documents:
        for sentence, entities in zip(document["sentences"], document["ner"], strict=True):
            entity_words = sum(end - start + 1 for start, end, _ in entities)
            assert entity_words < len(sentence), document["doc_key"]


def test_relation_arguments_are_sentence_entities(split_documents):
    _, documents = split_documents
    for document in documents:
        for entities, relations in zip(document["ner"], document["relations"], strict=True):
            spans = {(start, end) for start, end, _ in entities}
            for head_start, head_end, tail_start, tail_end, label in relations:
                assert (head_start, head_end) in spans, (document["doc_key"], head_start)
                assert (tail_start, tail_end) in spans, (document["doc_key"], tail_start)
                assert (head_start, head_end) != (tail_start, tail_end)
                assert label in RELATION_TYPES


def test_cluster_mentions_are_entities(split_documents):
    _, documents = split_documents
    for document in documents:
        spans = {(start, end) for entities in document["ner"] for start, end, _ in entities}
        mentions = [tuple(mention) for cluster in document["clusters"] for mention in cluster]
        assert len(mentions) == len(set(mentions)), document["doc_key"]
        for cluster in document["clusters"]:
            assert len(cluster) >= 2, document["doc_key"]
            for start, end in cluster:
                assert (start, end) in spans, (document["doc_key"], start, end)


def test_train_covers_all_types():
    documents = demo_documents("train")
    entity_types = {
        entity_type
        for document in documents
        for entities in document["ner"]
        for _, _, entity_type in entities
    }
    relation_types = {
        relation[4]
        for document in documents
        for relations in document["relations"]
        for relation in relations
    }
    assert entity_types == ENTITY_TYPES
    assert relation_types == RELATION_TYPES
    assert sum(len(document["clusters"]) for document in documents) > 0


def test_dev_has_names_unseen_in_train():
    def entity_names(split):
        names = set()
        for document in demo_documents(split):
            words = [word.lower() for sentence in document["sentences"] for word in sentence]
            for entities in document["ner"]:
                for start, end, entity_type in entities:
                    if entity_type != "Generic":
                        names.add(" ".join(words[start : end + 1]))
        return names

    train_names = entity_names("train")
    dev_names = entity_names("dev")
    assert dev_names - train_names
    assert dev_names & train_names


def test_write_demo_corpus(tmp_path):
    directory = tmp_path / "nested" / "scierc_demo"
    returned = write_demo_corpus(directory, seed=2)

    assert returned == directory
    assert sorted(path.name for path in directory.iterdir()) == EXPECTED_FILES
    for split, size in SPLIT_SIZES.items():
        lines = (directory / f"{split}.json").read_text(encoding="utf-8").splitlines()
        assert len(lines) == size
        assert [json.loads(line) for line in lines] == demo_documents(split, seed=2)


def test_write_demo_corpus_replaces_files(tmp_path):
    (tmp_path / "train.json").write_text("stale\n", encoding="utf-8")
    write_demo_corpus(str(tmp_path))

    lines = (tmp_path / "train.json").read_text(encoding="utf-8").splitlines()
    assert len(lines) == SPLIT_SIZES["train"]
    assert sorted(path.name for path in tmp_path.iterdir()) == EXPECTED_FILES
