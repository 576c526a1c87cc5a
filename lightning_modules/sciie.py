"""SciIE: one set of span representations for entities, relations and coreference.

Luan et al. (EMNLP 2018), "Multi-Task Identification of Entities, Relations, and
Coreference for Scientific Knowledge Graph Construction", with the BiLSTM replaced by a
pretrained transformer encoder as in DyGIE++ (Wadden et al., EMNLP 2019).

Notation: B documents, W words, M = ``max_span_width``, S = W * M candidate spans,
G span vector size, P kept spans, K antecedents, N same-sentence span pairs,
E entity types, R relation types.

Scores (section 3 of Luan et al.): every span gets a mention score m(i). Each task's
label scores add m to a task-specific score and give the "none" label the fixed score 0:

* entity:       s(i, e) = m(i) + f_e(g_i)
* relation:     s(i, j, r) = m(i) + m(j) + f_r([g_i, g_j, g_i * g_j])
* antecedent:   s(i, j) = m(i) + m(j) + f_c([c_i, c_j, c_i * c_j]), c = W_c g, dummy antecedent 0

Relation and coreference pairs are built only among the top ``ratio * W`` spans by m,
so the number of pairs grows linearly with document length.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from callbacks.media import log_table
from datamodules.scierc import Document, split_text
from lightning_modules.adapters import (
    AdapterHooks,
    BitFit,
    adapter_config,
    apply_adapter,
    describe_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from lightning_modules.backbones import Backbone, load_model, load_tokenizer
from lightning_modules.metrics import CorefMetrics, SetF1
from lightning_modules.spans.encoding import SubwordBatch, SubwordWindows, encode_words
from lightning_modules.spans.enumeration import (
    FeedForward,
    PairScorer,
    SpanCandidates,
    SpanRepresentation,
    batched_gather,
    enumerate_spans,
    prune_spans,
    span_index,
)

log = logging.getLogger(__name__)

EXPORT_CONFIG = "sciie.json"
EXPORT_HEADS = "heads.safetensors"
EXPORT_ENCODER = "encoder"
EXPORT_ENCODER_ADAPTER = "encoder_adapter"


@dataclass
class SciIEBatch:
    """Tensors for a batch of documents, with gold labels indexed by span."""

    subwords: SubwordBatch
    sentence_ids: Tensor  # [B, W], -1 at padding
    num_words: Tensor  # [B]
    entity_labels: Tensor  # [B, S], 0 = none, else 1 + index into entity_types
    cluster_ids: Tensor  # [B, S], 0 = in no gold cluster
    relation_keys: Tensor  # [R_gold] sorted (b * S + source span) * S + target span
    relation_labels: Tensor  # [R_gold], 1 + index into relation_types

    def to(self, device: torch.device | str) -> SciIEBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)}
        return type(self)(**moved)


@dataclass
class SciIEOutput:
    """Losses and scores of one forward pass; a skipped task leaves its fields None."""

    loss: Tensor
    spans: SpanCandidates
    entity_loss: Tensor | None = None
    entity_logits: Tensor | None = None  # [B, S, 1 + E]
    relation_loss: Tensor | None = None
    relation_pairs: tuple[Tensor, Tensor, Tensor] | None = (
        None  # (document, source span, target span), each [N]
    )
    relation_logits: Tensor | None = None  # [N, 1 + R]
    coref_loss: Tensor | None = None
    coref_spans: Tensor | None = None  # [B, P] span indices
    coref_keep: Tensor | None = None  # [B, P]
    antecedents: Tensor | None = None  # [B, P, K] span indices
    antecedent_logits: Tensor | None = None  # [B, P, 1 + K], column 0 is the dummy


class ExtractionMetrics(nn.Module):
    """Entity, relation, strict relation and coreference metrics for one split."""

    def __init__(self):
        super().__init__()
        self.ner = SetF1()
        self.rel = SetF1()
        self.rel_strict = SetF1()
        self.coref = CorefMetrics()

    @staticmethod
    def _typed_relations(document: Document) -> set[tuple]:
        types = {(start, end): label for start, end, label in document.entities}
        return {
            (s1, e1, types.get((s1, e1)), s2, e2, types.get((s2, e2)), label)
            for s1, e1, s2, e2, label in document.relations
        }

    def update(self, predicted: list[Document], gold: list[Document]) -> None:
        self.ner.update([set(d.entities) for d in predicted], [set(d.entities) for d in gold])
        self.rel.update([set(d.relations) for d in predicted], [set(d.relations) for d in gold])
        self.rel_strict.update(
            [self._typed_relations(d) for d in predicted], [self._typed_relations(d) for d in gold]
        )
        self.coref.update([d.clusters for d in predicted], [d.clusters for d in gold])

    def compute(self, tasks: set[str]) -> dict[str, Tensor]:
        results: dict[str, Tensor] = {}
        groups = {"ner": ["ner"], "relation": ["rel", "rel_strict"], "coref": ["coref"]}
        for task, names in groups.items():
            if task not in tasks:
                continue
            for name in names:
                for key, value in getattr(self, name).compute().items():
                    results[f"{name}/{key}"] = value
        return results

    def reset(self) -> None:
        for metric in (self.ner, self.rel, self.rel_strict, self.coref):
            metric.reset()


class SciIE(AdapterHooks):
    """Span-based joint extraction of entities, relations and coreference clusters.

    Args:
        encoder: transformers encoder (``pretrained`` name/dir or inline ``config``).
        entity_types: entity labels; None reads them from the training documents in
            ``setup`` (sorted), and the result is stored in the checkpoint.
        relation_types: relation labels, found like ``entity_types`` when None.
        max_span_width: maximum candidate span length in words (SciERC models use 8 to 10).
        window_size: subwords per encoder window including special tokens; capped at
            the encoder's maximum positions. Longer documents are split and stitched.
        width_embedding_dim: size of the span width embedding.
        hidden_dim: hidden size of every scorer.
        dropout: dropout inside the scorers.
        relation_spans_per_word: spans kept per word for relation pairs (DyGIE++ keeps 0.4).
        coref_spans_per_word: spans kept per word for coreference.
        max_antecedents: antecedent candidates per span for coreference.
        entity_weight: entity loss weight; 0 skips the entity scorer, loss, predictions
            and metrics.
        relation_weight: relation loss weight; 0 skips that task likewise.
        coref_weight: coreference loss weight; 0 skips that task likewise.
        learning_rate: AdamW learning rate of the span scorers.
        encoder_learning_rate: AdamW learning rate of the encoder.
        weight_decay: AdamW weight decay (all parameters).
        warmup_ratio: fraction of training steps with linear warm-up; then linear decay to 0.
        prior_probability: when set, the output biases of the entity and relation scorers
            start at log(p / (1 - p)). Every label then begins near a rare-class prior p
            instead of near the "none" score (Lin et al., 2017, "Focal Loss for Dense
            Object Detection", section 4.1). None keeps PyTorch's default initialisation.
        peft: a peft config (``peft.LoraConfig`` with ``target_modules: [query, value]``
            for BERT-style encoders, IA3, prompt or prefix tuning with
            ``task_type: FEATURE_EXTRACTION``) or ``BitFit``, applied to the encoder;
            the span scorers always train. ``encoder_learning_rate`` is then the
            adapter's learning rate. Prompt and prefix tuning take their virtual tokens
            from the encoder's positions, so windows get that many fewer subwords.
    """

    def __init__(
        self,
        encoder: Backbone,
        entity_types: list[str] | None = None,
        relation_types: list[str] | None = None,
        max_span_width: int = 8,
        window_size: int = 512,
        width_embedding_dim: int = 20,
        hidden_dim: int = 150,
        dropout: float = 0.4,
        relation_spans_per_word: float = 0.4,
        coref_spans_per_word: float = 0.4,
        max_antecedents: int = 100,
        entity_weight: float = 1.0,
        relation_weight: float = 1.0,
        coref_weight: float = 1.0,
        learning_rate: float = 1e-3,
        encoder_learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        prior_probability: float | None = None,
        peft: peft.PeftConfig | BitFit | None = None,
    ):
        super().__init__()
        encoder = Backbone.coerce(encoder)
        self._check_arguments(locals())
        self.save_hyperparameters(ignore=["encoder", "peft"])
        self.hparams["encoder"] = encoder.to_dict()
        self.hparams["peft"] = describe_adapter(peft)

        self.encoder = apply_adapter(load_model(encoder), peft)
        # from_pretrained returns the model in eval mode, and Lightning keeps each
        # submodule's mode, so the encoder's dropout would stay off while fine-tuning.
        self.encoder.train()
        self.tokenizer = load_tokenizer(encoder)
        self.windows = self._subword_windows()
        word_dim = self.encoder.config.hidden_size
        self.span_representation = SpanRepresentation(word_dim, max_span_width, width_embedding_dim)
        span_dim = self.span_representation.output_dim
        self.mention_scorer = FeedForward(span_dim, hidden_dim, 1, dropout=dropout)
        self.metrics = nn.ModuleDict({"val": ExtractionMetrics(), "test": ExtractionMetrics()})
        self.heads_built = False
        if entity_types is not None and relation_types is not None:
            self._build_heads()

    def _subword_windows(self) -> SubwordWindows:
        # NOTE: RoBERTa-style encoders offset positions by 2, so their usable window is
        # max_position_embeddings - 2; set window_size to 512 for those explicitly.
        window_size = self.hparams.window_size
        max_positions = getattr(self.encoder.config, "max_position_embeddings", window_size)
        adapter = adapter_config(self.encoder)
        if adapter is not None and adapter.is_prompt_learning:
            # Virtual tokens occupy the first positions of every window.
            max_positions -= adapter.num_virtual_tokens
        return SubwordWindows(self.tokenizer, min(window_size, max_positions))

    @staticmethod
    def _check_arguments(arguments: dict[str, Any]) -> None:
        problems = []
        for name in ("max_span_width", "max_antecedents"):
            if arguments[name] < 1:
                problems.append(f"{name}={arguments[name]} must be at least 1")
        positive = (
            "relation_spans_per_word",
            "coref_spans_per_word",
            "hidden_dim",
            "width_embedding_dim",
            "learning_rate",
            "encoder_learning_rate",
        )
        for name in positive:
            if arguments[name] <= 0:
                problems.append(f"{name}={arguments[name]} must be positive")

        weights = [arguments[name] for name in ("entity_weight", "relation_weight", "coref_weight")]
        if any(weight < 0 for weight in weights) or not any(weight > 0 for weight in weights):
            problems.append(
                f"task weights {weights} must be non-negative with at least one positive"
            )
        prior = arguments["prior_probability"]
        if prior is not None and not 0 < prior < 1:
            problems.append(f"prior_probability={prior} must be strictly between 0 and 1")
        if not 0 <= arguments["warmup_ratio"] <= 1:
            problems.append(f"warmup_ratio={arguments['warmup_ratio']} must be between 0 and 1")

        for name in ("entity_types", "relation_types"):
            labels = arguments[name]
            if labels is not None and len(set(labels)) != len(labels):
                problems.append(f"{name}={labels} contains duplicates")
        if arguments["encoder"].dtype != "float32":
            problems.append(
                f"encoder dtype {arguments['encoder'].dtype!r}: the span heads are float32, so keep "
                "the encoder in float32 and use trainer.precision bf16-mixed for lower precision"
            )
        if problems:
            raise ValueError("Invalid SciIE arguments: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------------ set-up

    @property
    def tasks(self) -> set[str]:
        weights = {"ner": "entity_weight", "relation": "relation_weight", "coref": "coref_weight"}
        return {task for task, name in weights.items() if self.hparams[name] > 0}

    def _build_heads(self) -> None:
        span_dim = self.span_representation.output_dim
        hidden_dim, dropout = self.hparams.hidden_dim, self.hparams.dropout
        self.entity_scorer = FeedForward(
            span_dim, hidden_dim, len(self.hparams.entity_types), dropout=dropout
        )
        self.relation_scorer = PairScorer(
            span_dim, hidden_dim, len(self.hparams.relation_types), dropout
        )
        self.antecedent_projection = nn.Linear(span_dim, hidden_dim)
        self.antecedent_scorer = PairScorer(hidden_dim, hidden_dim, 1, dropout)
        prior = self.hparams.prior_probability
        if prior is not None:
            bias = math.log(prior / (1 - prior))
            nn.init.constant_(self.entity_scorer[-1].bias, bias)
            nn.init.constant_(self.relation_scorer.rest[-1].bias, bias)
        self.heads_built = True

    def setup(self, stage: str) -> None:
        if self.heads_built:
            return
        # LightningModule.trainer raises RuntimeError when no Trainer is attached, so read
        # the private reference, which is None then.
        datamodule = getattr(self._trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "training_documents"):
            raise ValueError(
                "SciIE needs entity_types and relation_types, or a datamodule with "
                "training_documents() to read them from. Set model.entity_types and model.relation_types."
            )
        documents = datamodule.training_documents()
        if self.hparams.entity_types is None:
            self.hparams["entity_types"] = sorted(
                {label for d in documents for *_, label in d.entities}
            )
            log.info("Entity types from training data: %s", self.hparams.entity_types)
        if self.hparams.relation_types is None:
            self.hparams["relation_types"] = sorted(
                {label for d in documents for *_, label in d.relations}
            )
            log.info("Relation types from training data: %s", self.hparams.relation_types)
        self._build_heads()

    # ------------------------------------------------------------------ features

    def featurize(self, documents: list[Document]) -> SciIEBatch:
        """Tokenize ``documents`` and index their gold annotations by span (on the CPU)."""
        subwords = self.windows([document.words for document in documents])
        num_words = subwords.word_mask.shape[1]
        max_width = self.hparams.max_span_width
        num_spans = num_words * max_width
        entity_index = {label: index + 1 for index, label in enumerate(self.hparams.entity_types)}
        relation_index = {
            label: index + 1 for index, label in enumerate(self.hparams.relation_types)
        }

        sentence_ids = torch.full((len(documents), num_words), -1, dtype=torch.long)
        entity_labels = torch.zeros((len(documents), num_spans), dtype=torch.long)
        cluster_ids = torch.zeros((len(documents), num_spans), dtype=torch.long)
        relation_keys, relation_labels = [], []

        def fits(start: int, end: int) -> bool:
            return end - start < max_width

        for row, document in enumerate(documents):
            ids = document.sentence_ids
            sentence_ids[row, : len(ids)] = torch.tensor(ids)
            for start, end, label in document.entities:
                if label not in entity_index:
                    raise ValueError(
                        f"document {document.doc_key!r}: entity type {label!r} is not in entity_types "
                        f"{self.hparams.entity_types}. Add it to model.entity_types or fix the data."
                    )
                if fits(start, end):
                    entity_labels[row, span_index(start, end, max_width)] = entity_index[label]
            for cluster_number, cluster in enumerate(document.clusters, start=1):
                for start, end in cluster:
                    if fits(start, end):
                        cluster_ids[row, span_index(start, end, max_width)] = cluster_number
            for start1, end1, start2, end2, label in document.relations:
                if label not in relation_index:
                    raise ValueError(
                        f"document {document.doc_key!r}: relation type {label!r} is not in relation_types "
                        f"{self.hparams.relation_types}. Add it to model.relation_types or fix the data."
                    )
                if fits(start1, end1) and fits(start2, end2):
                    source = row * num_spans + span_index(start1, end1, max_width)
                    relation_keys.append(source * num_spans + span_index(start2, end2, max_width))
                    relation_labels.append(relation_index[label])

        keys = torch.tensor(relation_keys, dtype=torch.long)
        labels = torch.tensor(relation_labels, dtype=torch.long)
        keys, order = keys.sort()
        return SciIEBatch(
            subwords=subwords,
            sentence_ids=sentence_ids,
            num_words=torch.tensor([len(d.words) for d in documents]),
            entity_labels=entity_labels,
            cluster_ids=cluster_ids,
            relation_keys=keys,
            relation_labels=labels[order],
        )

    # ------------------------------------------------------------------ model

    def forward(self, batch: SciIEBatch) -> SciIEOutput:
        """Score all tasks for ``batch``; the loss is the weighted sum over active tasks."""
        words = encode_words(self.encoder, batch.subwords)  # [B, W, D]
        spans = enumerate_spans(batch.sentence_ids, self.hparams.max_span_width)
        mention_scores = self._score_all_spans(self.mention_scorer, words, spans).squeeze(
            -1
        )  # [B, S]
        mention_scores = mention_scores.masked_fill(~spans.mask, -1e4)

        output = SciIEOutput(loss=words.new_zeros(()), spans=spans)
        if "ner" in self.tasks:
            self._entities(output, batch, words, mention_scores)
            output.loss = output.loss + self.hparams.entity_weight * output.entity_loss
        if "relation" in self.tasks:
            self._relations(output, batch, words, mention_scores)
            output.loss = output.loss + self.hparams.relation_weight * output.relation_loss
        if "coref" in self.tasks:
            self._coreference(output, batch, words, mention_scores)
            output.loss = output.loss + self.hparams.coref_weight * output.coref_loss
        return output

    @staticmethod
    def _with_none_label(scores: Tensor) -> Tensor:
        """Prepend the fixed score 0 of the "none" label (or the dummy antecedent)."""
        return torch.cat([scores.new_zeros(*scores.shape[:-1], 1), scores], dim=-1)

    def _score_all_spans(self, scorer: FeedForward, words: Tensor, spans: SpanCandidates) -> Tensor:
        """``scorer(g)`` for every candidate span, [B, S, out], with the first layer projected per word."""
        hidden = self.span_representation.project(words, spans, scorer[0])  # [B, S, H]
        for layer in list(scorer)[1:]:
            hidden = layer(hidden)
        return hidden

    def _entities(
        self, output: SciIEOutput, batch: SciIEBatch, words: Tensor, mention: Tensor
    ) -> None:
        entity_scores = self._score_all_spans(self.entity_scorer, words, output.spans)  # [B, S, E]
        logits = self._with_none_label(mention.unsqueeze(-1) + entity_scores)  # [B, S, 1 + E]
        mask = output.spans.mask
        output.entity_logits = logits
        output.entity_loss = F.cross_entropy(
            logits[mask], batch.entity_labels[mask], reduction="sum"
        ) / len(mask)

    def _keep_count(self, batch: SciIEBatch, ratio: float) -> Tensor:
        return torch.clamp(torch.floor(batch.num_words * ratio), min=1).long()

    def _relations(
        self, output: SciIEOutput, batch: SciIEBatch, words: Tensor, mention: Tensor
    ) -> None:
        candidates = output.spans
        kept, keep = prune_spans(
            mention, candidates.mask, self._keep_count(batch, self.hparams.relation_spans_per_word)
        )
        sentence = batched_gather(
            batch.sentence_ids, batched_gather(candidates.starts, kept)
        )  # [B, P]

        # Ordered pairs of distinct kept spans in the same sentence.
        num_kept = kept.shape[1]
        pair_mask = (
            keep.unsqueeze(2) & keep.unsqueeze(1) & (sentence.unsqueeze(2) == sentence.unsqueeze(1))
        )
        pair_mask &= ~torch.eye(num_kept, dtype=torch.bool, device=kept.device)
        document, first, second = pair_mask.nonzero(as_tuple=True)  # each [N]
        source, target = kept[document, first], kept[document, second]  # span indices, [N]

        kept_vectors = self.span_representation(words, candidates, kept)  # [B, P, G]
        scores = self.relation_scorer.score_pairs(kept_vectors, document, first, second)  # [N, R]
        scores = scores + (mention[document, source] + mention[document, target]).unsqueeze(-1)
        logits = self._with_none_label(scores)  # [N, 1 + R]

        # Gold labels: look each pair's key up in the sorted gold keys.
        num_spans = mention.shape[1]
        keys = (document * num_spans + source) * num_spans + target
        labels = torch.zeros_like(keys)
        if batch.relation_keys.numel() > 0:
            position = torch.searchsorted(batch.relation_keys, keys).clamp(
                max=batch.relation_keys.numel() - 1
            )
            found = batch.relation_keys[position] == keys
            labels = torch.where(found, batch.relation_labels[position], labels)

        output.relation_pairs = (document, source, target)
        output.relation_logits = logits
        output.relation_loss = F.cross_entropy(logits, labels, reduction="sum") / len(mention)

    def _coreference(
        self, output: SciIEOutput, batch: SciIEBatch, words: Tensor, mention: Tensor
    ) -> None:
        candidates = output.spans
        kept, keep = prune_spans(
            mention, candidates.mask, self._keep_count(batch, self.hparams.coref_spans_per_word)
        )
        num_kept = kept.shape[1]
        num_antecedents = max(min(self.hparams.max_antecedents, num_kept - 1), 0)

        # The K kept spans right before each kept span are its antecedent candidates.
        offsets = torch.arange(1, num_antecedents + 1, device=kept.device)
        positions = torch.arange(num_kept, device=kept.device).unsqueeze(1) - offsets  # [P, K]
        valid = positions >= 0
        positions = positions.clamp(min=0)
        antecedents = kept[:, positions]  # [B, P, K]
        antecedent_mask = valid & keep[:, positions] & keep.unsqueeze(2)  # [B, P, K]

        # Pair features [c_i, c_j, c_i * c_j] on a projection c of g to hidden_dim, so the
        # P * K pairs cost H instead of G = 3D + width_dim per feature.
        kept_vectors = self.antecedent_projection(
            self.span_representation(words, candidates, kept)
        )  # [B, P, H]
        scorer = self.antecedent_scorer
        source_part = scorer.source(kept_vectors).unsqueeze(2)  # [B, P, 1, H]
        target_part = scorer.target(kept_vectors)[:, positions]  # [B, P, K, H]
        product_part = scorer.product(
            kept_vectors.unsqueeze(2) * kept_vectors[:, positions]
        )  # [B, P, K, H]
        pair_scores = scorer.rest(source_part + target_part + product_part).squeeze(-1)  # [B, P, K]
        scores = (
            batched_gather(mention, kept).unsqueeze(2)
            + batched_gather(mention, antecedents)
            + pair_scores
        )
        logits = self._with_none_label(scores.masked_fill(~antecedent_mask, -1e4))  # [B, P, 1 + K]

        # Marginal log-likelihood of all gold antecedents; the dummy is gold when there is none.
        cluster = batched_gather(batch.cluster_ids, kept)  # [B, P]
        antecedent_cluster = batched_gather(batch.cluster_ids, antecedents)  # [B, P, K]
        gold = (
            (antecedent_cluster == cluster.unsqueeze(2))
            & (cluster.unsqueeze(2) > 0)
            & antecedent_mask
        )
        gold = torch.cat([~gold.any(dim=2, keepdim=True), gold], dim=2)  # [B, P, 1 + K]
        marginal = logits.masked_fill(~gold, -1e4).logsumexp(dim=2) - logits.logsumexp(
            dim=2
        )  # [B, P]

        output.coref_spans, output.coref_keep = kept, keep
        output.antecedents, output.antecedent_logits = antecedents, logits
        output.coref_loss = -(marginal * keep).sum() / len(mention)

    # ------------------------------------------------------------------ decoding

    def decode(self, documents: list[Document], output: SciIEOutput) -> list[Document]:
        """Turn scores into predicted documents (argmax per span, pair and antecedent)."""
        predicted = [Document(d.doc_key, d.sentences) for d in documents]
        spans = output.spans
        starts, ends = spans.starts[0].tolist(), spans.ends[0].tolist()
        entity_types = self.hparams.entity_types
        relation_types = self.hparams.relation_types

        if output.entity_logits is not None:
            labels = output.entity_logits.argmax(-1).masked_fill(~spans.mask, 0)  # [B, S]
            for row, span, label in zip(
                *labels.nonzero(as_tuple=True), labels[labels > 0], strict=True
            ):
                predicted[row].entities.append((starts[span], ends[span], entity_types[label - 1]))

        if output.relation_logits is not None:
            labels = output.relation_logits.argmax(-1)  # [N]
            found = labels > 0
            document, source, target = (tensor[found].tolist() for tensor in output.relation_pairs)
            for row, first, second, label in zip(
                document, source, target, labels[found].tolist(), strict=True
            ):
                predicted[row].relations.append(
                    (
                        starts[first],
                        ends[first],
                        starts[second],
                        ends[second],
                        relation_types[label - 1],
                    )
                )

        if output.antecedent_logits is not None:
            best = output.antecedent_logits.argmax(-1)  # [B, P], 0 = dummy
            linked = (best > 0) & output.coref_keep
            rows, positions = linked.nonzero(as_tuple=True)
            mentions = output.coref_spans[rows, positions].tolist()
            antecedents = output.antecedents[rows, positions, best[rows, positions] - 1].tolist()
            links: dict[int, list[tuple[int, int]]] = {}
            for row, span, antecedent in zip(rows.tolist(), mentions, antecedents, strict=True):
                links.setdefault(row, []).append((span, antecedent))
            for row, pairs in links.items():
                predicted[row].clusters = _clusters_from_links(pairs, starts, ends)
        return predicted

    # ------------------------------------------------------------------ steps

    def training_step(self, documents: list[Document], batch_index: int) -> Tensor:
        batch = self.featurize(documents).to(self.device)
        output = self(batch)
        size = len(documents)
        self.log("train/loss", output.loss, prog_bar=True, batch_size=size)
        for task in ("entity", "relation", "coref"):
            value = getattr(output, f"{task}_loss")
            if value is not None:
                self.log(f"train/{task}_loss", value, batch_size=size)
        return output.loss

    def _evaluation_step(self, documents: list[Document], batch_index: int, split: str) -> None:
        batch = self.featurize(documents).to(self.device)
        output = self(batch)
        self.log(f"{split}/loss", output.loss, batch_size=len(documents), sync_dist=True)
        predicted = self.decode(documents, output)
        self.metrics[split].update(predicted, documents)
        if batch_index == 0:
            self._log_samples(split, predicted, documents)

    def _log_samples(self, split: str, predicted: list[Document], gold: list[Document]) -> None:
        """Log the first batch's gold and predicted entities and relations as a W&B table."""

        def show(document: Document) -> tuple[str, str]:
            words = document.words
            entities = "; ".join(
                f"{' '.join(words[start : end + 1])} ({label})"
                for start, end, label in sorted(document.entities)
            )
            relations = "; ".join(
                f"{' '.join(words[s1 : e1 + 1])} -{label}-> {' '.join(words[s2 : e2 + 1])}"
                for s1, e1, s2, e2, label in sorted(document.relations)
            )
            return entities, relations

        rows = []
        for prediction, reference in zip(predicted, gold, strict=True):
            gold_entities, gold_relations = show(reference)
            predicted_entities, predicted_relations = show(prediction)
            text = " ".join(reference.words)
            rows.append(
                [
                    reference.doc_key,
                    text,
                    gold_entities,
                    predicted_entities,
                    gold_relations,
                    predicted_relations,
                ]
            )
        columns = [
            "doc_key",
            "text",
            "gold entities",
            "predicted entities",
            "gold relations",
            "predicted relations",
        ]
        log_table(self._trainer, f"{split}/samples", columns, rows)

    def validation_step(self, documents: list[Document], batch_index: int) -> None:
        self._evaluation_step(documents, batch_index, "val")

    def test_step(self, documents: list[Document], batch_index: int) -> None:
        self._evaluation_step(documents, batch_index, "test")

    def _log_metrics(self, split: str) -> None:
        metrics = self.metrics[split]
        results = metrics.compute(self.tasks)
        # One number for model selection: the mean of each active task's main F1.
        headline = [
            results[name] for name in ("ner/f1", "rel/f1", "coref/avg_f1") if name in results
        ]
        results["avg_f1"] = torch.stack(headline).mean()
        self.log_dict({f"{split}/{name}": value for name, value in results.items()})
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, documents: list[Document], batch_index: int) -> list[dict]:
        batch = self.featurize(documents).to(self.device)
        return [document.to_record() for document in self.decode(documents, self(batch))]

    def configure_optimizers(self) -> dict:
        encoder_parameters = [p for p in self.encoder.parameters() if p.requires_grad]
        encoder_ids = {id(p) for p in encoder_parameters}
        head_parameters = [
            p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids
        ]
        optimizer = torch.optim.AdamW(
            [
                {"params": encoder_parameters, "lr": self.hparams.encoder_learning_rate},
                {"params": head_parameters, "lr": self.hparams.learning_rate},
            ],
            weight_decay=self.hparams.weight_decay,
        )
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup_steps = int(self.hparams.warmup_ratio * total_steps)

        def schedule(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / (warmup_steps + 1)
            return max(0.0, (total_steps - step) / max(total_steps - warmup_steps, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ export

    def export_artifact(self, directory: Path) -> None:
        """Write encoder and tokenizer (``save_pretrained``), heads (safetensors) and config JSON."""
        from safetensors.torch import save_file

        directory = Path(directory)
        adapter = adapter_config(self.encoder)
        if adapter is not None and adapter.is_prompt_learning:
            # Virtual tokens cannot be merged into weights: the base encoder and the
            # adapter are written separately and from_export puts them back together.
            self.encoder.get_base_model().save_pretrained(
                directory / EXPORT_ENCODER, safe_serialization=True
            )
            save_adapter(self.encoder, directory / EXPORT_ENCODER_ADAPTER)
        else:
            encoder = (
                self.encoder if adapter is None else merge_adapter(copy.deepcopy(self.encoder))
            )
            encoder.save_pretrained(directory / EXPORT_ENCODER, safe_serialization=True)
        self.tokenizer.save_pretrained(directory / EXPORT_ENCODER)
        heads = {
            name: tensor.detach().cpu().contiguous()
            for name, tensor in self.state_dict().items()
            if not name.startswith(("encoder.", "metrics."))
        }
        save_file(heads, str(directory / EXPORT_HEADS))
        # Only constructor arguments: LightningCLI adds private keys such as _class_path.
        arguments = inspect.signature(type(self).__init__).parameters
        config = {
            key: value
            for key, value in self.hparams.items()
            if key in arguments and key not in ("encoder", "peft")
        }
        config["encoder"] = {"dtype": self.hparams.encoder["dtype"]}
        (directory / EXPORT_CONFIG).write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )

    @classmethod
    def from_export(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> SciIE:
        """Load an exported extractor onto ``map_location``; ``model.extract(["text ..."])`` runs it."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / EXPORT_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found: {directory} is not a SciIE export directory."
            )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        encoder = Backbone(
            pretrained=str(directory / EXPORT_ENCODER), dtype=config.pop("encoder")["dtype"]
        )
        arguments = inspect.signature(cls.__init__).parameters
        unknown = sorted(key for key in config if key not in arguments)
        if unknown:
            raise ValueError(
                f"{config_path} has keys {unknown} that SciIE does not take; "
                "it was written by another version. Remove them or re-export."
            )
        model = cls(encoder=encoder, **config)
        if (directory / EXPORT_ENCODER_ADAPTER).is_dir():
            model.encoder = load_adapter(model.encoder, directory / EXPORT_ENCODER_ADAPTER)
            model.windows = model._subword_windows()
        missing, unexpected = model.load_state_dict(
            load_file(str(directory / EXPORT_HEADS)), strict=False
        )
        missing = [name for name in missing if not name.startswith(("encoder.", "metrics."))]
        if missing or unexpected:
            raise ValueError(
                f"{directory / EXPORT_HEADS} does not match SciIE: missing {missing}, unexpected {unexpected}."
            )
        return model.to(map_location).eval()

    @torch.no_grad()
    def extract(self, texts: list[str], batch_size: int = 8) -> list[dict]:
        """Extract entities, relations and clusters from raw texts; returns SciERC records."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError(
                "extract() takes a list of strings, one per document; wrap a single text in a list."
            )
        documents = [
            Document(f"text-{index}", split_text(text)) for index, text in enumerate(texts)
        ]
        empty = [index for index, document in enumerate(documents) if not document.sentences]
        if empty:
            raise ValueError(f"texts at positions {empty} contain no words.")
        was_training = self.training
        self.eval()
        records = []
        for start in range(0, len(documents), batch_size):
            chunk = documents[start : start + batch_size]
            batch = self.featurize(chunk).to(self.device)
            records += [document.to_record() for document in self.decode(chunk, self(batch))]
        self.train(was_training)
        return records


def _clusters_from_links(
    links: list[tuple[int, int]], starts: list[int], ends: list[int]
) -> list[list[tuple[int, int]]]:
    """Group span indices connected by antecedent links into clusters (union-find)."""
    parent: dict[int, int] = {}

    def root(span: int) -> int:
        parent.setdefault(span, span)
        while parent[span] != span:
            parent[span] = parent[parent[span]]
            span = parent[span]
        return span

    for span, antecedent in links:
        parent[root(span)] = root(antecedent)
    groups: dict[int, list[tuple[int, int]]] = {}
    for span in parent:
        groups.setdefault(root(span), []).append((starts[span], ends[span]))
    return [sorted(group) for group in groups.values()]
