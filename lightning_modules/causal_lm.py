"""Supervised fine-tuning of a causal language model on prompt/response pairs.

The loss is the mean next-token cross-entropy over response tokens only: prompt
tokens and padding get the label -100, which ``F.cross_entropy`` ignores. When the
tokenizer has a chat template, the prompt is rendered as one user turn followed by the
assistant header, so the model learns to answer in the format it is prompted with.
The response ends with the tokenizer's end-of-sequence token (its separator token when
it has none).

Notation: B records, T tokens.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor

from datamodules.prompt_response import PromptResponse
from lightning_modules.adapters import (
    AdapterHooks,
    BitFit,
    adapter_config,
    adapters_disabled,
    apply_adapter,
    describe_adapter,
    has_switchable_adapter,
    merge_adapter,
    save_adapter,
)
from lightning_modules.backbones import Backbone, load_model, load_tokenizer

IGNORE_INDEX = -100
# A prompt: a text (one user turn), or chat messages [{"role": ..., "content": ...}].
Prompt = str | list[dict[str, str]]
# Role names written for tokenizers without a chat template.
ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def plain_conversation(messages: list[dict[str, str]]) -> str:
    """Write chat messages as "Human: ..." and "Assistant: ..." paragraphs."""
    return "\n\n".join(f"{ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in messages)


@dataclass
class TokenBatch:
    """Padded token ids with response-only labels."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    labels: Tensor  # [B, T], IGNORE_INDEX outside the response

    def to(self, device: torch.device | str) -> TokenBatch:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def response_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of predicting token t + 1 from position t, over labelled tokens.

    Args:
        logits: [B, T, V] scores.
        labels: [B, T] token ids, IGNORE_INDEX where no loss is taken.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # [B * (T - 1), V]
    shifted_labels = labels[:, 1:].reshape(-1)  # [B * (T - 1)]
    return F.cross_entropy(shifted_logits.float(), shifted_labels, ignore_index=IGNORE_INDEX)


class CausalLM(AdapterHooks):
    """Fine-tune a causal LM, fully or through a PEFT adapter.

    Args:
        model: the causal LM (``pretrained`` name/dir, ``gguf_file``, or inline ``config``).
        peft: a peft config (e.g. ``peft.LoraConfig``) or ``BitFit``; None trains
            every parameter.
        max_length: maximum tokens per record. Longer records lose the beginning of the
            prompt (down to half of ``max_length``) and then the end of the response.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        export_merged: with a peft adapter, also export the model with the adapter
            merged into its weights (``merged/``), next to the adapter alone.

    Export (``export_artifact``): ``adapter/`` (peft adapter only, safetensors) when
    ``peft`` is a peft config, plus ``merged/`` when ``export_merged``; otherwise
    ``model/`` (the whole model, ``save_pretrained``). ``tokenizer/`` and
    ``causal_lm.json`` (backbone and adapter settings) always.
    """

    def __init__(
        self,
        model: Backbone,
        peft: peft.PeftConfig | BitFit | None = None,
        max_length: int = 256,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        export_merged: bool = False,
    ):
        super().__init__()
        from transformers import AutoModelForCausalLM

        if max_length < 2:
            raise ValueError(
                f"max_length={max_length} must be at least 2 (a prompt and a response token)."
            )
        spec = Backbone.coerce(model)
        self.save_hyperparameters(ignore=["model", "peft"])
        self.hparams["model"] = spec.to_dict()
        self.hparams["peft"] = describe_adapter(peft)

        self.tokenizer = load_tokenizer(spec)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = apply_adapter(load_model(spec, AutoModelForCausalLM), peft)
        self.model.train()

    def featurize(self, records: list[PromptResponse]) -> TokenBatch:
        """Tokenize records into right-padded ids with labels on response tokens only."""
        rows = []
        for record in records:
            prompt_ids, response_ids = self._truncate(*self._prompt_response_ids(record))
            ids = prompt_ids + response_ids
            labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
            rows.append((ids, labels))
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, row_labels) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.tensor(row_labels)
        return TokenBatch(input_ids, attention_mask, labels)

    def _truncate(
        self, prompt_ids: list[int], response_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        """Fit a prompt and its response into ``max_length`` tokens.

        The prompt loses its beginning, down to half of ``max_length`` when the response
        needs the room, and then the response loses its end. So a long prompt never
        leaves a record without response tokens.
        """
        limit = self.hparams.max_length
        if len(prompt_ids) + len(response_ids) <= limit:
            return prompt_ids, response_ids
        kept = max(limit - len(response_ids), min(len(prompt_ids), limit // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - kept :]
        return prompt_ids, response_ids[: limit - len(prompt_ids)]

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Return the token ids of ``prompt`` as the model reads it before the response.

        ``prompt`` is a text (one user turn) or a conversation: a list of
        ``{"role", "content"}`` messages that ends with a user turn. Without a chat
        template, a conversation is written as "Human: ...", "Assistant: ..." paragraphs
        ending with "Assistant:".
        """
        tokenizer = self.tokenizer
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if tokenizer.chat_template:
            prompt_text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        elif isinstance(prompt, str):
            prompt_text = prompt + "\n"
        else:
            prompt_text = plain_conversation(messages) + "\n\nAssistant: "
        return tokenizer(prompt_text, add_special_tokens=False)["input_ids"]

    def _prompt_response_ids(self, record: PromptResponse) -> tuple[list[int], list[int]]:
        prompt_ids = self.prompt_ids(record.prompt)
        response_ids = self.tokenizer(record.response, add_special_tokens=False)["input_ids"]
        end_id = self.end_token_id
        if end_id is not None:
            response_ids = response_ids + [end_id]
        return prompt_ids, response_ids

    @property
    def end_token_id(self) -> int | None:
        """Token that ends a response: end-of-sequence, else separator (BERT-style vocabularies)."""
        if self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        return self.tokenizer.sep_token_id

    @torch.no_grad()
    def generate(
        self,
        prompts: list[Prompt],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_return_sequences: int = 1,
    ) -> list[str]:
        """Answer each prompt; greedy unless ``do_sample``.

        Returns ``len(prompts) * num_return_sequences`` answers, those of each prompt
        together and in prompt order, without the prompt and the end token. Dropout is
        off while generating and the previous training mode is restored afterwards.
        Sampling draws from torch's global generator (``torch.manual_seed`` fixes it).
        """
        if not prompts:
            return []
        rows = [self.prompt_ids(prompt) for prompt in prompts]
        length = max(len(ids) for ids in rows)
        pad_id = self.tokenizer.pad_token_id
        # Left padding, so every row's answer starts at the same position.
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            attention_mask[row, length - len(ids) :] = 1
        options = {"do_sample": do_sample, "num_return_sequences": num_return_sequences}
        if do_sample:
            options.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            # The checkpoint's generation config may set sampling values; greedy ignores them.
            options.update(temperature=None, top_p=None, top_k=None)
        was_training = self.model.training
        self.model.eval()
        try:
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=self.end_token_id,
                **options,
            )
        finally:
            self.model.train(was_training)
        return self.tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)

    def generate_reference(self, prompts: list[Prompt], **options) -> list[str]:
        """Answer each prompt with the reference model (:meth:`keep_reference`).

        ``options`` are those of :meth:`generate`.
        """
        reference = getattr(self, "reference_model", None)
        if reference is None:
            with adapters_disabled(self.model):
                return self.generate(prompts, **options)
        policy = self.model
        self.model = reference
        try:
            return self.generate(prompts, **options)
        finally:
            self.model = policy

    # ------------------------------------------------------------ frozen reference

    def keep_reference(self) -> None:
        """Keep the current weights as the reference model of KL and preference terms.

        With a peft adapter the reference is the same model with the adapter switched
        off, so nothing is copied. Otherwise a frozen copy is made now.
        """
        switchable = isinstance(self.model, PeftModel) or has_switchable_adapter(self.model)
        self.reference_model = (
            None if switchable else copy.deepcopy(self.model).requires_grad_(False).eval()
        )

    @torch.no_grad()
    def reference_logits(self, batch: TokenBatch) -> Tensor:
        """Return the [B, T, V] logits of the reference model (see :meth:`keep_reference`)."""
        reference = getattr(self, "reference_model", None)
        if reference is None:
            with adapters_disabled(self.model):
                return self.token_logits(batch)
        logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits[:, -batch.input_ids.shape[1] :]

    def train(self, mode: bool = True) -> CausalLM:
        super().train(mode)
        if getattr(self, "reference_model", None) is not None:
            self.reference_model.eval()
        return self

    def token_logits(self, batch: TokenBatch) -> Tensor:
        """Return the [B, T, V] logits at the input tokens of ``batch``."""
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        # Prompt tuning prepends its virtual tokens, so the logits are longer than the
        # input; the last T positions are those of the input tokens.
        return logits[:, -batch.input_ids.shape[1] :]

    def forward(self, batch: TokenBatch) -> Tensor:
        """Return the response-token loss of ``batch``."""
        return response_token_loss(self.token_logits(batch), batch.labels)

    # Sophia's Hessian refresh (callbacks.hessian.HessianRefresh) calls these two.

    def hessian_logits(self, records: list[PromptResponse]) -> tuple[Tensor, Tensor]:
        """Return the [B, T - 1, V] logits that predict tokens 2..T and the [B, T - 1] mask of
        response tokens among them, for the Gauss-Newton-Bartlett estimate."""
        batch = self.featurize(records).to(self.device)
        return self.token_logits(batch)[:, :-1], batch.labels[:, 1:] != IGNORE_INDEX

    def hessian_loss(self, records: list[PromptResponse]) -> Tensor:
        """Return the training loss of ``records`` with its graph, for the Hutchinson estimate."""
        return self(self.featurize(records).to(self.device))

    def training_step(self, records: list[PromptResponse], batch_index: int) -> Tensor:
        loss = self(self.featurize(records).to(self.device))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(records))
        return loss

    def validation_step(self, records: list[PromptResponse], batch_index: int) -> None:
        loss = self(self.featurize(records).to(self.device))
        self.log("val/loss", loss, prog_bar=True, batch_size=len(records), sync_dist=True)

    def export_artifact(self, directory: Path) -> None:
        """Write the fine-tuned model: the adapter alone, merged, or whole (see the class doc)."""
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        (directory / "causal_lm.json").write_text(
            json.dumps({"model": self.hparams.model, "peft": self.hparams.peft}, indent=2) + "\n"
        )
        if adapter_config(self.model) is None:
            self.model.save_pretrained(str(directory / "model"), safe_serialization=True)
            return
        save_adapter(self.model, directory / "adapter")
        if self.hparams.export_merged:
            merged = merge_adapter(copy.deepcopy(self.model))
            merged.save_pretrained(str(directory / "merged"), safe_serialization=True)
