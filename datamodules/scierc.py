"""SciERC-format documents: reading, validation, raw-text input and batching.

Record schema (one JSON object per line, as released with SciERC, Luan et al. 2018):

* ``doc_key`` (str): document id.
* ``sentences`` (list of list of str): the words of each sentence.
* ``ner`` (list per sentence of ``[start, end, type]``): entity mentions. Offsets are
  word indices into the whole document (sentences concatenated), end inclusive.
* ``relations`` (list per sentence of ``[start1, end1, start2, end2, type]``): directed
  relations from the first argument to the second, both inside that sentence.
* ``clusters`` (list of clusters, each a list of ``[start, end]``): coreference.

``ner``, ``relations`` and ``clusters`` may be absent in prediction input. A prediction
record may instead hold raw ``text`` (str), which :func:`split_text` turns into
sentences and words.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from datamodules.jsonl import JsonlRecord, read_jsonl
from datamodules.loading import record_loader

log = logging.getLogger(__name__)

Span = tuple[int, int]


@dataclass
class Document:
    """One validated document; offsets are document-level word indices, end inclusive."""

    doc_key: str
    sentences: list[list[str]]
    entities: list[tuple[int, int, str]] = field(default_factory=list)
    relations: list[tuple[int, int, int, int, str]] = field(default_factory=list)
    clusters: list[list[Span]] = field(default_factory=list)

    @property
    def words(self) -> list[str]:
        return [word for sentence in self.sentences for word in sentence]

    @property
    def sentence_ids(self) -> list[int]:
        """Sentence index of every word."""
        return [index for index, sentence in enumerate(self.sentences) for _ in sentence]

    def to_record(self) -> dict:
        """Return the SciERC JSON object of this document."""
        bounds = _sentence_bounds(self.sentences)
        ner: list[list] = [[] for _ in self.sentences]
        relations: list[list] = [[] for _ in self.sentences]
        for start, end, label in sorted(self.entities):
            ner[_sentence_of(bounds, start)].append([start, end, label])
        for start1, end1, start2, end2, label in sorted(self.relations):
            relations[_sentence_of(bounds, start1)].append([start1, end1, start2, end2, label])
        clusters = [[list(span) for span in sorted(cluster)] for cluster in self.clusters]
        return {
            "doc_key": self.doc_key,
            "sentences": self.sentences,
            "ner": ner,
            "relations": relations,
            "clusters": clusters,
        }


# A sentence ends at ., ! or ? followed by whitespace and an ASCII capital letter, a digit,
# a quote or an opening bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
# Words are runs of letters/digits joined by inner hyphens, apostrophes or periods
# (``state-of-the-art``, ``e.g``, ``3.5``), or single punctuation marks.
_WORD = re.compile(r"\w+(?:[-'.]\w+)*|[^\w\s]")


def split_text(text: str) -> list[list[str]]:
    """Split raw text into sentences of words with two regular expressions.

    Dependency-light and predictable rather than linguistically complete: abbreviations
    such as "Fig. 2" can end a sentence early. Pre-split ``sentences`` give full control.
    """
    sentences = []
    for chunk in _SENTENCE_END.split(text.strip()):
        words = _WORD.findall(chunk)
        if words:
            sentences.append(words)
    return sentences


def _sentence_bounds(sentences: Sequence[Sequence[str]]) -> list[Span]:
    bounds, start = [], 0
    for sentence in sentences:
        bounds.append((start, start + len(sentence) - 1))
        start += len(sentence)
    return bounds


def _sentence_of(bounds: list[Span], word: int) -> int:
    for index, (start, end) in enumerate(bounds):
        if start <= word <= end:
            return index
    raise IndexError(word)


def _check_span(
    record: JsonlRecord, field_name: str, value: object, span: Span, limit: Span
) -> None:
    start, end = span
    if end < start:
        raise record.error(
            field_name, value, f"end {end} is before start {start}", "swap or fix the offsets"
        )
    if start < limit[0] or end > limit[1]:
        raise record.error(
            field_name,
            value,
            f"span [{start}, {end}] lies outside words {limit[0]}..{limit[1]} of its sentence or document",
            "offsets are document-level word indices with inclusive ends; recompute them",
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_document(record: JsonlRecord, require_labels: bool = True) -> Document:
    """Validate one SciERC record (or a raw-text record when ``require_labels`` is False)."""
    data = record.data
    doc_key = str(data.get("doc_key", f"{record.path.name}:{record.line}"))

    if "sentences" not in data and not require_labels and "text" in data:
        text = record.require("text", str)
        sentences = split_text(text)
        if not sentences:
            raise record.error("text", text, "no words found", "give non-empty text")
        return Document(doc_key, sentences)

    sentences = record.require("sentences", list)
    if not sentences:
        raise record.error(
            "sentences", sentences, "empty document", "give at least one sentence of words"
        )
    for index, sentence in enumerate(sentences):
        if (
            not isinstance(sentence, list)
            or not sentence
            or not all(isinstance(w, str) for w in sentence)
        ):
            raise record.error(
                f"sentences[{index}]",
                sentence,
                "expected a non-empty list of word strings",
                "write each sentence as a list of strings; drop empty sentences",
            )
    bounds = _sentence_bounds(sentences)
    document_limit = (0, bounds[-1][1])

    for name in ("ner", "relations"):
        if name not in data and not require_labels:
            data = {**data, name: [[] for _ in sentences]}
        if name not in data:
            raise record.error(
                name, None, "missing", f"add {name!r} with one (possibly empty) list per sentence"
            )
        per_sentence = data[name]
        if not isinstance(per_sentence, list):
            raise record.error(
                name,
                per_sentence,
                f"expected a list, got {type(per_sentence).__name__}",
                "write one list of annotations per sentence",
            )
        if len(per_sentence) != len(sentences):
            raise record.error(
                name,
                f"{len(per_sentence)} lists",
                f"expected one list per sentence ({len(sentences)})",
                "add an empty list for sentences without annotations",
            )
        for sentence_index, items in enumerate(per_sentence):
            if not isinstance(items, list):
                raise record.error(
                    f"{name}[{sentence_index}]",
                    items,
                    f"expected a list, got {type(items).__name__}",
                    "write the sentence's annotations as a (possibly empty) list",
                )

    entities = []
    for sentence_index, mentions in enumerate(data["ner"]):
        for mention in mentions:
            if (
                not isinstance(mention, list)
                or len(mention) != 3
                or not (_is_int(mention[0]) and _is_int(mention[1]) and isinstance(mention[2], str))
            ):
                raise record.error(
                    f"ner[{sentence_index}]",
                    mention,
                    "expected [start, end, type]",
                    "write each mention as [int, int, str]",
                )
            _check_span(
                record,
                f"ner[{sentence_index}]",
                mention,
                (mention[0], mention[1]),
                bounds[sentence_index],
            )
            entities.append((mention[0], mention[1], mention[2]))

    relations = []
    for sentence_index, items in enumerate(data["relations"]):
        for relation in items:
            if (
                not isinstance(relation, list)
                or len(relation) != 5
                or not all(_is_int(value) for value in relation[:4])
                or not isinstance(relation[4], str)
            ):
                raise record.error(
                    f"relations[{sentence_index}]",
                    relation,
                    "expected [start1, end1, start2, end2, type]",
                    "write each relation as four ints and a str",
                )
            for span in ((relation[0], relation[1]), (relation[2], relation[3])):
                _check_span(
                    record, f"relations[{sentence_index}]", relation, span, bounds[sentence_index]
                )
            relations.append(tuple(relation))

    cluster_list = data.get("clusters", [])
    if not isinstance(cluster_list, list):
        raise record.error(
            "clusters",
            cluster_list,
            f"expected a list, got {type(cluster_list).__name__}",
            "write clusters as a list of clusters, each a list of [start, end]",
        )
    clusters = []
    cluster_of: dict[Span, int] = {}
    for cluster_index, cluster in enumerate(cluster_list):
        if not isinstance(cluster, list):
            raise record.error(
                f"clusters[{cluster_index}]",
                cluster,
                "expected a list of [start, end]",
                "write each cluster as a list of mentions",
            )
        spans = []
        for mention in cluster:
            if (
                not isinstance(mention, list)
                or len(mention) != 2
                or not all(_is_int(v) for v in mention)
            ):
                raise record.error(
                    f"clusters[{cluster_index}]",
                    mention,
                    "expected [start, end]",
                    "write each mention as two ints",
                )
            _check_span(
                record,
                f"clusters[{cluster_index}]",
                mention,
                (mention[0], mention[1]),
                document_limit,
            )
            span = (mention[0], mention[1])
            if cluster_of.get(span) == cluster_index:
                continue  # listed twice in the same cluster (SciERC has such cases): keep one
            if span in cluster_of:
                raise record.error(
                    f"clusters[{cluster_index}]",
                    mention,
                    f"mention is already in cluster {cluster_of[span]}",
                    "merge the clusters that share it, or drop the duplicate",
                )
            cluster_of[span] = cluster_index
            spans.append(span)
        clusters.append(spans)

    labels: dict[Span, str] = {}
    for start, end, label in entities:
        if labels.setdefault((start, end), label) != label:
            raise record.error(
                "ner",
                [start, end, label],
                f"span already has type {labels[(start, end)]!r}",
                "give each span one entity type",
            )

    return Document(doc_key, sentences, entities, relations, clusters)


def read_documents(path: str | Path, require_labels: bool = True) -> list[Document]:
    """Read and validate every document of a SciERC JSON Lines file."""
    return [parse_document(record, require_labels) for record in read_jsonl(path)]


class SciERCDataModule(pl.LightningDataModule):
    """SciERC train/dev/test files, or the embedded demo sample when ``data_dir`` is None.

    Args:
        data_dir: directory with the three files; None writes and uses the project's
            embedded demo sample (synthetic abstracts, see :mod:`datamodules.scierc_demo`).
        train_file: training file name inside ``data_dir``.
        val_file: validation file name inside ``data_dir``.
        test_file: test file name inside ``data_dir``.
        predict_file: JSON Lines to extract from; records hold ``sentences`` or raw ``text``.
        batch_size: documents per batch.
        num_workers: DataLoader worker processes.
        seed: shuffling seed (the epoch number is added each epoch).
        max_train_documents: use only the first N training documents (None: all).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        train_file: str = "train.json",
        val_file: str = "dev.json",
        test_file: str = "test.json",
        predict_file: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        max_train_documents: int | None = None,
    ):
        super().__init__()
        if max_train_documents is not None and max_train_documents < 1:
            raise ValueError(
                f"max_train_documents={max_train_documents} must be at least 1, or None for all."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1.")
        self.save_hyperparameters()
        self.splits: dict[str, list[Document]] = {}

    def _directory(self) -> Path:
        if self.hparams.data_dir is not None:
            return Path(self.hparams.data_dir)
        from datamodules.scierc_demo import write_demo_corpus
        from lightning_modules.backbones.loading import cache_root

        directory = cache_root() / "scierc_demo"
        if not all(
            (directory / name).is_file() for name in ("train.json", "dev.json", "test.json")
        ):
            write_demo_corpus(directory)
        return directory

    def prepare_data(self) -> None:
        # Lightning calls this on one process before any rank runs setup, so the demo
        # sample exists before it is read.
        self._directory()

    def setup(self, stage: str) -> None:
        directory = self._directory()
        names = {
            "train": self.hparams.train_file,
            "val": self.hparams.val_file,
            "test": self.hparams.test_file,
        }
        needed_splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}[
            stage
        ]
        for split in needed_splits:
            if split not in self.splits:
                self.splits[split] = read_documents(directory / names[split])
        if "train" in self.splits and self.hparams.max_train_documents is not None:
            self.splits["train"] = self.splits["train"][: self.hparams.max_train_documents]
        if stage == "predict":
            if self.hparams.predict_file is None:
                raise ValueError(
                    "predict needs data.predict_file: a JSON Lines file of sentences or text."
                )
            self.splits["predict"] = read_documents(self.hparams.predict_file, require_labels=False)

    def training_documents(self) -> list[Document]:
        """Training documents, for label-set discovery by the model."""
        if "train" not in self.splits:
            self.setup("fit")
        return self.splits["train"]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hparams = self.hparams
        return record_loader(
            self.splits[split], hparams.batch_size, shuffle, hparams.seed, hparams.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
