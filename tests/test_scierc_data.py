"""Tests for SciERC reading: validation errors, real-file counts, raw text and round trips."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from datamodules.jsonl import DataValidationError, JsonlRecord, write_jsonl
from datamodules.scierc import Document, parse_document, read_documents, split_text

SCIERC_DIR = Path(__file__).resolve().parents[2] / "shared/data/scierc"

# Two sentences: words 0-2 and words 3-4.
VALID_RECORD = {
    "doc_key": "valid",
    "sentences": [["We", "parse", "text"], ["It", "works"]],
    "ner": [[[1, 1, "Method"], [2, 2, "Material"]], [[3, 3, "Generic"]]],
    "relations": [[[1, 1, 2, 2, "USED-FOR"]], []],
    "clusters": [[[1, 1], [3, 3]]],
}


def with_fields(**changes) -> dict:
    record = json.loads(json.dumps(VALID_RECORD))
    for name, value in changes.items():
        if value is None:
            del record[name]
        else:
            record[name] = value
    return record


def write_lines(path: Path, bad_line: str) -> Path:
    """Write a valid record, a blank line and then ``bad_line``, which is line 3."""
    path.write_text(json.dumps(VALID_RECORD) + "\n\n" + bad_line + "\n", encoding="utf-8")
    return path


# Each case: record changes, the field the error names, and text of the value's repr.
INVALID_CASES = {
    "offset past document": ({"ner": [[[1, 9, "Method"]], []]}, "ner[0]", "[1, 9, 'Method']"),
    "negative offset": ({"ner": [[[-1, 0, "Method"]], []]}, "ner[0]", "[-1, 0, 'Method']"),
    "ner crosses sentence": ({"ner": [[[2, 3, "Method"]], []]}, "ner[0]", "[2, 3, 'Method']"),
    "ner in other sentence": ({"ner": [[], [[0, 0, "Method"]]]}, "ner[1]", "[0, 0, 'Method']"),
    "end before start": ({"ner": [[[2, 1, "Method"]], []]}, "ner[0]", "[2, 1, 'Method']"),
    "string offsets": ({"ner": [[["1", "1", "Method"]], []]}, "ner[0]", "['1', '1', 'Method']"),
    "bool offset": ({"ner": [[[True, 1, "Method"]], []]}, "ner[0]", "[True, 1, 'Method']"),
    "ner not a list per sentence": ({"ner": [5, []]}, "ner[0]", "5"),
    "ner not a list": ({"ner": "none"}, "ner", "'none'"),
    "relation crosses sentence": (
        {"relations": [[[1, 1, 3, 3, "USED-FOR"]], []]},
        "relations[0]",
        "[1, 1, 3, 3, 'USED-FOR']",
    ),
    "relation with four values": (
        {"relations": [[[1, 1, 2, 2]], []]},
        "relations[0]",
        "[1, 1, 2, 2]",
    ),
    "relations not a list per sentence": ({"relations": [[], None]}, "relations[1]", "None"),
    "cluster past document": ({"clusters": [[[1, 1], [4, 5]]]}, "clusters[0]", "[4, 5]"),
    "cluster mention of three values": ({"clusters": [[[1, 1, 2]]]}, "clusters[0]", "[1, 1, 2]"),
    "clusters not a list": ({"clusters": 7}, "clusters", "7"),
    "sentences not a list": ({"sentences": "We parse text"}, "sentences", "'We parse text'"),
    "sentence not a list": (
        {"sentences": ["We parse text", ["It", "works"]]},
        "sentences[0]",
        "'We parse text'",
    ),
    "non-string word": (
        {"sentences": [["We", 3, "text"], ["It", "works"]]},
        "sentences[0]",
        "['We', 3, 'text']",
    ),
    "empty sentence": ({"sentences": [["We", "parse", "text"], []]}, "sentences[1]", "[]"),
    "too many ner lists": ({"ner": [[], [], []]}, "ner", "'3 lists'"),
    "too few relation lists": ({"relations": [[]]}, "relations", "'1 lists'"),
    "empty document": ({"sentences": [], "ner": [], "relations": []}, "sentences", "[]"),
    "missing sentences": ({"sentences": None}, "sentences", "None"),
    "missing ner": ({"ner": None}, "ner", "None"),
    "mention in two clusters": (
        {"clusters": [[[1, 1], [3, 3]], [[3, 3], [2, 2]]]},
        "clusters[1]",
        "[3, 3]",
    ),
    "span with two types": (
        {"ner": [[[1, 1, "Method"], [1, 1, "Task"]], []]},
        "ner",
        "[1, 1, 'Task']",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_CASES))
def test_invalid_record_raises(tmp_path, case):
    changes, field, shown_value = INVALID_CASES[case]
    path = write_lines(tmp_path / "broken_split.json", json.dumps(with_fields(**changes)))

    with pytest.raises(DataValidationError) as raised:
        read_documents(path)

    error = raised.value
    message = str(error)
    assert f"{path}:3:" in message
    assert "broken_split.json" in message
    assert f"field {field!r}" in message
    assert f"= {shown_value}:" in message
    assert error.line == 3
    assert error.field == field
    assert "Fix:" in message


def test_invalid_json_line_raises(tmp_path):
    path = write_lines(tmp_path / "truncated.json", '{"doc_key": "cut", "sentences": [["a"')

    with pytest.raises(DataValidationError) as raised:
        read_documents(path)

    message = str(raised.value)
    assert "truncated.json:3:" in message
    assert "field '<line>'" in message
    assert '\'{"doc_key": "cut", "sentences": [["a"\'' in message
    assert "invalid JSON" in message
    assert raised.value.line == 3


def test_json_array_line_raises(tmp_path):
    path = write_lines(tmp_path / "array.json", "[1, 2]")

    with pytest.raises(DataValidationError) as raised:
        read_documents(path)

    assert "array.json:3:" in str(raised.value)
    assert "= [1, 2]:" in str(raised.value)
    assert "expected a JSON object, got list" in str(raised.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_documents(tmp_path / "absent.json")


def test_valid_record_parses(tmp_path):
    path = write_lines(tmp_path / "ok.json", json.dumps(VALID_RECORD))
    documents = read_documents(path)

    assert len(documents) == 2
    document = documents[1]
    assert document.doc_key == "valid"
    assert document.words == ["We", "parse", "text", "It", "works"]
    assert document.sentence_ids == [0, 0, 0, 1, 1]
    assert document.entities == [(1, 1, "Method"), (2, 2, "Material"), (3, 3, "Generic")]
    assert document.relations == [(1, 1, 2, 2, "USED-FOR")]
    assert document.clusters == [[(1, 1), (3, 3)]]


# ---------------------------------------------------------------- real SciERC files

# Documents, sentences, entity mentions, relations and coreference clusters per split
# of the processed SciERC release (Luan et al., 2018: 350/50/100 abstracts).
SCIERC_COUNTS = {
    "train": (350, 1861, 5598, 3219, 720),
    "dev": (50, 275, 811, 455, 100),
    "test": (100, 551, 1685, 974, 195),
}
SCIERC_ENTITY_TYPES = {
    "OtherScientificTerm": 2270,
    "Method": 2091,
    "Generic": 1338,
    "Task": 1284,
    "Material": 771,
    "Metric": 340,
}
SCIERC_RELATION_TYPES = {
    "USED-FOR": 2437,
    "CONJUNCTION": 582,
    "EVALUATE-FOR": 454,
    "HYPONYM-OF": 409,
    "PART-OF": 269,
    "FEATURE-OF": 264,
    "COMPARE": 233,
}

needs_scierc = pytest.mark.skipif(
    not SCIERC_DIR.is_dir(), reason=f"SciERC data not found at {SCIERC_DIR}"
)


@pytest.fixture(scope="module")
def scierc_splits():
    return {split: read_documents(SCIERC_DIR / f"{split}.json") for split in SCIERC_COUNTS}


@needs_scierc
@pytest.mark.parametrize("split", sorted(SCIERC_COUNTS))
def test_scierc_split_counts(scierc_splits, split):
    documents = scierc_splits[split]
    num_documents, num_sentences, num_entities, num_relations, num_clusters = SCIERC_COUNTS[split]

    assert len(documents) == num_documents
    assert sum(len(d.sentences) for d in documents) == num_sentences
    assert sum(len(d.entities) for d in documents) == num_entities
    assert sum(len(d.relations) for d in documents) == num_relations
    assert sum(len(d.clusters) for d in documents) == num_clusters


@needs_scierc
def test_scierc_label_counts(scierc_splits):
    documents = [document for split in scierc_splits.values() for document in split]
    entity_types = Counter(label for d in documents for *_, label in d.entities)
    relation_types = Counter(label for d in documents for *_, label in d.relations)

    assert dict(entity_types) == SCIERC_ENTITY_TYPES
    assert dict(relation_types) == SCIERC_RELATION_TYPES


# ---------------------------------------------------------------- raw text


def test_split_text_worked_example():
    text = (
        "We propose a state-of-the-art parser, e.g. for 3.5 languages. "
        "It beats the baseline by 2 points! (Results hold.)  "
    )
    assert split_text(text) == [
        [
            "We",
            "propose",
            "a",
            "state-of-the-art",
            "parser",
            ",",
            "e.g",
            ".",
            "for",
            "3.5",
            "languages",
            ".",
        ],
        ["It", "beats", "the", "baseline", "by", "2", "points", "!"],
        ["(", "Results", "hold", ".", ")"],
    ]


def test_split_text_lowercase_does_not_split():
    # A period followed by a lower-case word is not a sentence end.
    assert split_text("See fig. two. Done") == [["See", "fig", ".", "two", "."], ["Done"]]
    assert split_text("   ") == []


def test_raw_text_record_without_labels():
    record = JsonlRecord(
        Path("predict.json"), 4, {"doc_key": "raw", "text": "Parsers parse. They work."}
    )
    document = parse_document(record, require_labels=False)

    assert document.doc_key == "raw"
    assert document.sentences == [["Parsers", "parse", "."], ["They", "work", "."]]
    assert document.entities == []
    assert document.relations == []
    assert document.clusters == []


def test_raw_text_record_needs_sentences_with_labels():
    record = JsonlRecord(Path("predict.json"), 4, {"doc_key": "raw", "text": "Parsers parse."})

    with pytest.raises(DataValidationError) as raised:
        parse_document(record, require_labels=True)

    assert "predict.json:4:" in str(raised.value)
    assert raised.value.field == "sentences"


def test_raw_text_without_words_raises():
    record = JsonlRecord(Path("predict.json"), 2, {"text": "   "})

    with pytest.raises(DataValidationError) as raised:
        parse_document(record, require_labels=False)

    assert raised.value.field == "text"
    assert "predict.json:2:" in str(raised.value)


def test_unlabelled_sentences_record():
    record = JsonlRecord(Path("predict.json"), 1, {"sentences": [["A", "parser"]]})
    document = parse_document(record, require_labels=False)

    assert document.doc_key == "predict.json:1"
    assert document.sentences == [["A", "parser"]]
    assert document.entities == []


# ---------------------------------------------------------------- round trip


def test_document_record_round_trip(tmp_path):
    document = Document(
        "round-trip",
        [["Neural", "parsers", "help", "tagging"], ["They", "are", "fast", "."]],
        entities=[
            (0, 1, "Method"),
            (3, 3, "Task"),
            (4, 4, "Generic"),
            (6, 6, "OtherScientificTerm"),
        ],
        relations=[(0, 1, 3, 3, "USED-FOR"), (4, 4, 6, 6, "FEATURE-OF")],
        clusters=[[(0, 1), (4, 4)]],
    )
    record = document.to_record()

    assert record["ner"] == [
        [[0, 1, "Method"], [3, 3, "Task"]],
        [[4, 4, "Generic"], [6, 6, "OtherScientificTerm"]],
    ]
    assert record["relations"] == [[[0, 1, 3, 3, "USED-FOR"]], [[4, 4, 6, 6, "FEATURE-OF"]]]
    assert record["clusters"] == [[[0, 1], [4, 4]]]

    path = tmp_path / "round_trip.json"
    write_jsonl(path, [record])
    assert read_documents(path) == [document]


def test_duplicate_mention_in_one_cluster_kept_once():
    record = JsonlRecord(Path("d.json"), 1, with_fields(clusters=[[[1, 1], [3, 3], [1, 1]]]))
    assert parse_document(record).clusters == [[(1, 1), (3, 3)]]
