"""Word representations from a subword encoder, for documents longer than its window.

Notation: B documents, W words (padded), N encoder windows in the batch, L subword
positions per window (padded), D hidden size.

Each word is represented by its first subword. A document whose subwords do not fit in
one window is cut into overlapping windows (half-window stride). Every subword then
takes its vector from the window in which it has the most context on both sides, so
the stitched sequence has no seams at window edges.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class SubwordBatch:
    """Encoder input for a batch of documents and where each word's vector comes from."""

    input_ids: Tensor  # [N, L]
    attention_mask: Tensor  # [N, L]
    word_positions: Tensor  # [B, W] index into the flattened [N * L] encoder output
    word_mask: Tensor  # [B, W] bool, False for padding

    def to(self, device: torch.device | str) -> SubwordBatch:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class SubwordWindows:
    """Tokenize pre-split documents into encoder windows.

    Args:
        tokenizer: a fast transformers tokenizer (``word_ids()`` is needed).
        window_size: subwords per window including special tokens; at most the
            encoder's maximum position count.
    """

    def __init__(self, tokenizer, window_size: int):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is a slow tokenizer; word alignment needs a fast one "
                "(a tokenizer.json next to the model)."
            )
        self.tokenizer = tokenizer
        self.window_size = window_size
        # The special tokens around one sequence, read off by encoding a single word both
        # ways: e.g. [CLS] ... [SEP] for BERT, <s> ... </s> for RoBERTa.
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        prefix_length = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
        self.prefix = full[:prefix_length]
        self.suffix = full[prefix_length + len(plain) :]
        self.prefix_length = len(self.prefix)
        self.content_length = window_size - len(self.prefix) - len(self.suffix)
        if self.content_length < 2:
            raise ValueError(
                f"window_size={window_size} leaves fewer than 2 subwords per window after the special "
                "tokens; use a window of at least 16 subwords (the encoder's maximum is typical)."
            )

    def _window_starts(self, length: int) -> list[int]:
        if length <= self.content_length:
            return [0]
        stride = self.content_length // 2
        starts = list(range(0, length - self.content_length, stride))
        starts.append(length - self.content_length)
        return starts

    def _first_subwords(self, words: list[str]) -> tuple[list[int], list[int]]:
        encoding = self.tokenizer(words, is_split_into_words=True, add_special_tokens=False)
        subword_ids = encoding["input_ids"]
        first = [-1] * len(words)
        for position, word_index in enumerate(encoding.word_ids()):
            if word_index is not None and first[word_index] < 0:
                first[word_index] = position
        # A word the tokenizer drops entirely (e.g. a lone control character) borrows
        # the nearest preceding subword, or the first one.
        previous = 0
        for index, position in enumerate(first):
            if position < 0:
                first[index] = previous
            else:
                previous = position
        if not subword_ids:
            subword_ids = [self.tokenizer.unk_token_id]
        return subword_ids, first

    def __call__(self, documents: list[list[str]]) -> SubwordBatch:
        """Build the batch for ``documents``, each a list of words."""
        windows: list[list[int]] = []
        word_positions: list[list[int]] = []
        for words in documents:
            subword_ids, first = self._first_subwords(words)
            starts = self._window_starts(len(subword_ids))
            base = len(windows)
            for start in starts:
                content = subword_ids[start : start + self.content_length]
                windows.append(self.prefix + content + self.suffix)

            # Choose, for every subword, the window that gives it the most context.
            positions = torch.arange(len(subword_ids))[:, None]  # [n, 1]
            window_starts = torch.tensor(starts)[None, :]  # [1, n_windows]
            window_ends = torch.clamp(window_starts + self.content_length, max=len(subword_ids)) - 1
            context = torch.minimum(
                positions - window_starts, window_ends - positions
            )  # [n, n_windows]
            best = context.argmax(dim=1)  # ties go to the earlier window
            offset = positions[:, 0] - window_starts[0, best] + self.prefix_length
            flat = (base + best) * self.window_size + offset  # filled in with the final L below
            word_positions.append(
                [(int(flat[p]), int(base + best[p]), int(offset[p])) for p in first]
            )

        length = max(len(window) for window in windows)
        input_ids = torch.full(
            (len(windows), length), self.tokenizer.pad_token_id or 0, dtype=torch.long
        )
        attention_mask = torch.zeros((len(windows), length), dtype=torch.long)
        for row, window in enumerate(windows):
            input_ids[row, : len(window)] = torch.tensor(window)
            attention_mask[row, : len(window)] = 1

        max_words = max(len(words) for words in documents)
        positions = torch.zeros((len(documents), max_words), dtype=torch.long)
        mask = torch.zeros((len(documents), max_words), dtype=torch.bool)
        for row, entries in enumerate(word_positions):
            positions[row, : len(entries)] = torch.tensor(
                [window * length + offset for _, window, offset in entries]
            )
            mask[row, : len(entries)] = True
        return SubwordBatch(input_ids, attention_mask, positions, mask)


def encode_words(encoder: torch.nn.Module, batch: SubwordBatch) -> Tensor:
    """Run ``encoder`` over the windows and return word vectors [B, W, D] (zeros at padding)."""
    hidden = encoder(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state
    # A prompt-tuned encoder returns its virtual tokens first; the subwords are the last L.
    hidden = hidden[:, -batch.input_ids.shape[1] :]  # [N, L, D]
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N * L, D]
    words = flat[batch.word_positions]  # [B, W, D]
    return words * batch.word_mask.unsqueeze(-1)
