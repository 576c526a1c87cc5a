"""Synthetic SciERC-style abstracts for the demo run of span-based information extraction.

The sample is this project's own writing: short abstracts composed from sentence templates and
word lists in this module, made to exercise all three SciERC tasks (entity spans, relations and
coreference clusters) without any download. It is not a benchmark, and scores on it cannot be
compared with scores on SciERC.

Records follow the SciERC JSON Lines layout: ``doc_key``, ``sentences`` (lists of words),
``ner`` and ``relations`` (one list per sentence) and document-level ``clusters``. All offsets are
document-level word indices with inclusive ends, and every relation argument and every cluster
mention is an entity span. About a quarter of the entity names of each type never occur in the
train split, so dev and test scores show whether a model uses context rather than memorized names.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

SPLIT_SIZES = {"train": 160, "dev": 40, "test": 40}

OST = "OtherScientificTerm"


def _combine(
    singles: tuple[str, ...], modifiers: tuple[str, ...], heads: tuple[str, ...]
) -> list[str]:
    pairs = itertools.product(modifiers, heads)
    return list(singles) + [f"{modifier} {head}" for modifier, head in pairs]


# Entity names by type, 566 in all.
_NAMES: dict[str, list[str]] = {
    "Method": _combine(
        (
            "beam search",
            "dynamic programming",
            "expectation maximization",
            "self-training",
            "co-training",
            "bootstrapping",
            "perceptron",
            "gradient boosting",
        ),
        (
            "hierarchical",
            "bayesian",
            "recurrent",
            "sparse",
            "graph-based",
            "probabilistic",
            "discriminative",
            "latent-variable",
            "kernel-based",
            "convolutional",
            "unsupervised",
            "incremental",
            "spectral",
            "stochastic",
            "attention-based",
            "semi-supervised",
        ),
        (
            "parser",
            "tagger",
            "classifier",
            "encoder",
            "clustering algorithm",
            "ranking model",
            "alignment model",
            "decoder",
            "random field",
            "neural network",
            "inference procedure",
            "boosting scheme",
        ),
    ),
    "Task": _combine(
        ("summarization", "question answering", "dependency parsing", "object tracking"),
        (
            "cross-lingual",
            "biomedical",
            "multi-document",
            "open-domain",
            "low-resource",
            "fine-grained",
            "large-scale",
            "interactive",
            "online",
            "multilingual",
        ),
        (
            "question answering",
            "word sense disambiguation",
            "image retrieval",
            "entity recognition",
            "summarization",
            "object tracking",
            "dependency parsing",
            "speaker identification",
            "topic detection",
            "paraphrase generation",
            "relation extraction",
            "scene labeling",
        ),
    ),
    "Material": _combine(
        ("English", "German", "Mandarin", "Arabic", "Japanese", "Hindi"),
        (
            "newswire",
            "patent",
            "clinical",
            "microblog",
            "broadcast speech",
            "product review",
            "legal",
            "scientific",
            "parliamentary",
            "web",
            "dialogue",
            "image caption",
        ),
        ("corpus", "treebank", "collection", "benchmark", "archive", "data set"),
    ),
    "Metric": _combine(
        ("BLEU", "ROUGE", "perplexity", "mean average precision"),
        (
            "word",
            "character",
            "sentence",
            "macro-averaged",
            "micro-averaged",
            "token-level",
            "span-level",
            "label",
        ),
        ("error rate", "accuracy", "F1 score", "precision", "recall", "agreement", "edit distance"),
    ),
    OST: _combine(
        (),
        (
            "syntactic",
            "semantic",
            "lexical",
            "acoustic",
            "visual",
            "prosodic",
            "morphological",
            "temporal",
            "spatial",
            "contextual",
            "discourse",
            "phonetic",
        ),
        (
            "features",
            "constraints",
            "dependencies",
            "cues",
            "patterns",
            "representations",
            "similarity",
            "structure",
        ),
    ),
    "Generic": [
        "previous approaches",
        "existing methods",
        "earlier systems",
        "standard techniques",
        "conventional models",
        "popular algorithms",
        "several baselines",
        "classical solutions",
    ],
}

# Share of each type's names (Generic excepted) that only dev and test use.
_HELD_OUT_FRACTION = 0.25

# Template roles. An upper-case role names one entity for the whole document, so its repeated
# mentions form a coreference cluster. A lower-case role takes a fresh name in every sentence.
_ROLE_TYPES = {
    "M": "Method",
    "B": "Method",
    "C": "Method",
    "T": "Task",
    "D": "Material",
    "D2": "Material",
    "E": "Metric",
    "F": OST,
    "H": OST,
    "g": "Generic",
    "k": "Task",
    "m": "Method",
    "o": OST,
}

# Generic phrases that can refer back to an upper-case role after its first mention.
_REFERENCES = {
    "M": ("this method", "the proposed approach", "our model", "the approach", "our system"),
    "T": ("this task", "the problem"),
    "D": ("this corpus", "the data"),
}
_REFERENCE_PROBABILITY = 0.6

# A template is a sentence with <role> slots and its relations as "ARG1 LABEL ARG2" strings.
# Every opening template introduces the proposed method M and the task T.
_OPENINGS = (
    (
        "In this paper , we propose <M> for <T> , which remains difficult when little annotated "
        "text is available .",
        ("M USED-FOR T",),
    ),
    (
        "We present <M> , a new way to address <T> that exploits <F> learned from unlabeled input .",
        ("M USED-FOR T", "F USED-FOR M"),
    ),
    (
        "<T> has received much attention in recent years , and this paper introduces <M> as a "
        "solution .",
        ("M USED-FOR T",),
    ),
    (
        "This paper addresses <T> with <M> , which combines <C> and <F> in a single framework .",
        ("M USED-FOR T", "C PART-OF M", "C CONJUNCTION F", "F USED-FOR M"),
    ),
)
_BODIES = (
    (
        "<M> relies on <C> to compute <F> from the raw input at every step .",
        ("C PART-OF M", "C USED-FOR F"),
    ),
    (
        "In our experiments , <M> consistently outperforms <B> on <D> by a large margin .",
        ("M COMPARE B", "D EVALUATE-FOR M"),
    ),
    (
        "<E> on <D> is used to evaluate <M> under several different training settings .",
        ("E EVALUATE-FOR M", "D EVALUATE-FOR M"),
    ),
    (
        "Unlike <g> such as <B> , <M> does not require hand-written rules or large amounts of "
        "labeled examples .",
        ("B HYPONYM-OF g",),
    ),
    (
        "The <F> of <D> can be captured together with <H> , so no external resources are needed .",
        ("F FEATURE-OF D", "F CONJUNCTION H"),
    ),
    (
        "<M> improves <E> over <B> , a strong baseline that depends on <o> .",
        ("M COMPARE B", "E EVALUATE-FOR M", "o USED-FOR B"),
    ),
    (
        "We also apply <M> to <k> and observe similar gains without changing any hyperparameters .",
        ("M USED-FOR k",),
    ),
    (
        "<C> is a key component of <M> and is trained jointly with the remaining parts .",
        ("C PART-OF M",),
    ),
    (
        "Our analysis shows that <H> is a useful property of <D> for the purposes of <T> .",
        ("H FEATURE-OF D", "D USED-FOR T"),
    ),
    (
        "<B> and <m> serve as reference systems , and both of them are trained on <D> .",
        ("B CONJUNCTION m", "D USED-FOR B"),
    ),
    ("<m> can be seen as a special case of <M> that ignores <F> entirely .", ("m HYPONYM-OF M",)),
    (
        "Results on <D> and <D2> confirm that <M> generalizes well across very different domains .",
        ("D CONJUNCTION D2", "D EVALUATE-FOR M", "D2 EVALUATE-FOR M"),
    ),
    (
        "Compared with <B> , <M> raises <E> by several points while using far less memory .",
        ("M COMPARE B", "E EVALUATE-FOR M"),
    ),
    (
        "During training , <o> and <F> are fed into <C> , which is kept fixed afterwards .",
        ("o CONJUNCTION F", "o USED-FOR C", "F USED-FOR C"),
    ),
)
_CONNECTIVES = ("Moreover ,", "In addition ,", "Furthermore ,", "As a result ,", "Notably ,")
_CONNECTIVE_PROBABILITY = 0.3
_BODY_SENTENCES = (2, 5)


def _name_pools(split: str, seed: int) -> dict[str, list[str]]:
    """Return the entity names per type for ``split``. Train omits the held-out share."""
    pools = {}
    for entity_type, names in _NAMES.items():
        ordered = sorted(names)
        if entity_type != "Generic":
            random.Random(f"scierc-demo-names/{seed}/{entity_type}").shuffle(ordered)
            if split == "train":
                ordered = ordered[: round(len(ordered) * (1 - _HELD_OUT_FRACTION))]
        pools[entity_type] = ordered
    return pools


class _AbstractBuilder:
    """State of one abstract under construction: sentences, entities, relations, role mentions."""

    def __init__(self, rng: random.Random, pools: dict[str, list[str]]):
        self.rng = rng
        self.pools = pools
        self.role_names: dict[str, list[str]] = {}
        self.role_mentions: dict[str, list[list[int]]] = {}
        self.used_names: set[str] = set()
        self.sentences: list[list[str]] = []
        self.ner: list[list[list[Any]]] = []
        self.relations: list[list[list[Any]]] = []
        self.offset = 0

    def _fresh_name(self, entity_type: str) -> list[str]:
        # Names stay distinct within a document, so an equal name always means the same role.
        candidates = [name for name in self.pools[entity_type] if name not in self.used_names]
        name = self.rng.choice(candidates)
        self.used_names.add(name)
        return name.split()

    def _mention(self, role: str, is_subject: bool) -> tuple[list[str], str]:
        entity_type = _ROLE_TYPES[role]
        if role.islower():
            return self._fresh_name(entity_type), entity_type
        if role not in self.role_names:
            self.role_names[role] = self._fresh_name(entity_type)
            return self.role_names[role], entity_type
        if role in _REFERENCES and self.rng.random() < _REFERENCE_PROBABILITY:
            phrases = _REFERENCES[role] + (("it",) if role == "M" and is_subject else ())
            return self.rng.choice(phrases).split(), "Generic"
        return self.role_names[role], entity_type

    def add_sentence(self, template: tuple[str, tuple[str, ...]], connective: str | None) -> None:
        text, relation_specs = template
        tokens = text.split()
        words: list[str] = []
        if connective:
            words = connective.split()
            # The template's first word no longer starts the sentence. A slot such as "<M>" is
            # unchanged because its first character is "<".
            tokens[0] = tokens[0][:1].lower() + tokens[0][1:]
        spans: dict[str, tuple[int, int, str]] = {}
        for token in tokens:
            if not (token.startswith("<") and token.endswith(">")):
                words.append(token)
                continue
            role = token[1:-1]
            # "it" reads correctly only where a clause starts.
            is_subject = not words or words[-1] == ","
            mention, entity_type = self._mention(role, is_subject)
            start = self.offset + len(words)
            words.extend(mention)
            spans[role] = (start, self.offset + len(words) - 1, entity_type)
            if role.isupper():
                self.role_mentions.setdefault(role, []).append([start, spans[role][1]])
        words[0] = words[0][:1].upper() + words[0][1:]

        sentence_relations = []
        for spec in relation_specs:
            head, label, tail = spec.split()
            sentence_relations.append([*spans[head][:2], *spans[tail][:2], label])
        self.sentences.append(words)
        self.ner.append([list(span) for span in sorted(spans.values())])
        self.relations.append(sentence_relations)
        self.offset += len(words)

    def to_record(self, doc_key: str) -> dict[str, Any]:
        clusters = [mentions for mentions in self.role_mentions.values() if len(mentions) >= 2]
        return {
            "doc_key": doc_key,
            "sentences": self.sentences,
            "ner": self.ner,
            "relations": self.relations,
            "clusters": clusters,
        }


def _generate_document(
    rng: random.Random, pools: dict[str, list[str]], doc_key: str
) -> dict[str, Any]:
    builder = _AbstractBuilder(rng, pools)
    builder.add_sentence(rng.choice(_OPENINGS), connective=None)
    for template in rng.sample(_BODIES, rng.randint(*_BODY_SENTENCES)):
        use_connective = rng.random() < _CONNECTIVE_PROBABILITY
        builder.add_sentence(template, rng.choice(_CONNECTIVES) if use_connective else None)
    return builder.to_record(doc_key)


def demo_documents(split: str, seed: int = 0) -> list[dict[str, Any]]:
    """Generate the synthetic abstracts of one split (160 train, 40 dev or 40 test documents).

    The output depends only on ``split`` and ``seed``. Each split draws from its own random stream,
    and dev and test also use the held-out names that never occur in train.

    Raises:
        ValueError: ``split`` is not "train", "dev" or "test".
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"invalid split {split!r}: expected one of {sorted(SPLIT_SIZES)}")
    rng = random.Random(f"scierc-demo/{split}/{seed}")
    pools = _name_pools(split, seed)
    return [
        _generate_document(rng, pools, f"demo_{split}_{index:03d}")
        for index in range(SPLIT_SIZES[split])
    ]


def _write_jsonl_atomically(path: Path, records: list[dict[str, Any]]) -> None:
    # A reader never sees a half-written file because os.replace swaps in the complete one.
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_demo_corpus(directory: str | Path, seed: int = 0) -> Path:
    """Write ``train.json``, ``dev.json`` and ``test.json`` (JSON Lines) into ``directory``.

    Creates ``directory`` if needed and replaces existing files. Returns the directory as a Path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_SIZES:
        _write_jsonl_atomically(directory / f"{split}.json", demo_documents(split, seed))
    return directory
