"""TOFU evaluation of a causal LM: per-question answer losses and greedy answers, then the
benchmark's metrics (:mod:`lightning_modules.metrics.tofu`).

Four question sets, each a TOFU ``*_perturbed.json`` file:

- ``forget``: the forget split (e.g. ``forget01_perturbed.json``);
- ``retain``: questions about the authors kept (e.g. ``retain_perturbed.json``);
- ``real_authors`` and ``world_facts``: general knowledge the model should keep.

Each record has ``question``, ``answer`` and ``perturbed_answer`` (a list of wrong
answers of the same form), and on the forget and retain sets ``paraphrased_answer``.
The truth ratio compares the paraphrased answer with the perturbed ones; where a set has
no paraphrase (real authors, world facts) it compares the answer itself, as the TOFU
authors' evaluation does.

A question's loss is the mean next-token cross-entropy of the answer tokens, end token
included, given the question in the module's prompt format (its chat template when it
has one). Greedy answers are generated with the same prompt.

Results are written as JSON: ``metrics`` (the numbers below) and ``per_question`` (for
each set: losses, truth ratios and generated answers). Forget quality needs the forget
truth ratios of a model fine-tuned without the forget set: give the JSON that this
evaluation wrote for that model as ``retain_model_results``.

Metric names: ``tofu/<set>/probability``, ``tofu/<set>/rouge``,
``tofu/<set>/truth_ratio``, ``tofu/model_utility`` and ``tofu/forget_quality``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from callbacks.media import log_table
from callbacks.run_config import run_directory
from datamodules.prompt_response import PromptResponse, read_prompt_response
from lightning_modules.losses.unlearning import response_log_probs
from lightning_modules.metrics import tofu as metrics

log = logging.getLogger(__name__)

SETS = ("forget", "retain", "real_authors", "world_facts")


@dataclass
class TofuQuestion:
    """One evaluation question with the answers it is scored on."""

    question: str
    answer: str
    base_answer: str  # the paraphrased answer, or the answer where there is none
    perturbed: list[str]
    location: str


def read_tofu_questions(path: str | Path, limit: int | None = None) -> list[TofuQuestion]:
    """Read a TOFU ``*_perturbed.json`` file of n questions.

    With ``limit``, keep every (n // limit)-th question, at most ``limit`` of them. Unless
    n is a multiple of ``limit``, the last n mod ``limit`` questions can stay out (of
    world facts' 117 with a limit of 20, questions 0, 5, ..., 95 are kept).
    """
    records = read_prompt_response(path, "question", "answer")
    questions = []
    for record in records:
        perturbed = record.extra.get("perturbed_answer")
        if (
            not isinstance(perturbed, list)
            or not perturbed
            or not all(isinstance(text, str) and text.strip() for text in perturbed)
        ):
            raise ValueError(
                f"{record.location}: field 'perturbed_answer' must be a non-empty list of "
                f"non-empty strings, got {perturbed!r}; use a TOFU *_perturbed.json file."
            )
        base = record.extra.get("paraphrased_answer") or record.response
        questions.append(
            TofuQuestion(record.prompt, record.response, base, perturbed, record.location)
        )
    counts = {len(question.perturbed) for question in questions}
    if len(counts) != 1:
        raise ValueError(
            f"{path}: every record needs the same number of perturbed answers; found "
            f"{sorted(counts)}."
        )
    if limit is not None:
        if limit < 1:
            raise ValueError(f"{path}: a question limit of {limit} must be at least 1.")
        questions = questions[:: max(1, len(questions) // limit)][:limit]
    return questions


@torch.no_grad()
def answer_losses(
    module: Any, prompts: list[str], answers: list[str], batch_size: int
) -> np.ndarray:
    """Return the [N] mean answer-token cross-entropy of each (prompt, answer) pair.

    ``module`` is a :class:`lightning_modules.causal_lm.CausalLM` (``featurize`` and
    ``token_logits``). Dropout is off while scoring.
    """
    was_training = module.training
    module.eval()
    try:
        losses = []
        for start in range(0, len(prompts), batch_size):
            records = [
                PromptResponse(prompt, answer, "")
                for prompt, answer in zip(
                    prompts[start : start + batch_size],
                    answers[start : start + batch_size],
                    strict=True,
                )
            ]
            batch = module.featurize(records).to(module.device)
            log_probs, counts = response_log_probs(module.token_logits(batch), batch.labels)
            losses.append((-log_probs / counts.clamp(min=1)).cpu())
    finally:
        module.train(was_training)
    return torch.cat(losses).double().numpy()


def evaluate_set(
    module: Any, questions: list[TofuQuestion], batch_size: int, max_new_tokens: int
) -> dict[str, list]:
    """Score one question set: answer losses, perturbed losses and greedy answers."""
    prompts = [question.question for question in questions]
    count = len(questions[0].perturbed)
    true = answer_losses(module, prompts, [q.answer for q in questions], batch_size)
    base = answer_losses(module, prompts, [q.base_answer for q in questions], batch_size)
    perturbed = answer_losses(
        module,
        [prompt for prompt in prompts for _ in range(count)],
        [text for question in questions for text in question.perturbed],
        batch_size,
    ).reshape(len(questions), count)
    generated = []
    for start in range(0, len(prompts), batch_size):
        generated += module.generate(prompts[start : start + batch_size], max_new_tokens)
    return {
        "true_loss": true.tolist(),
        "base_loss": base.tolist(),
        "perturbed_loss": perturbed.tolist(),
        "truth_ratio": metrics.truth_ratios(base, perturbed).tolist(),
        "generated": [text.strip() for text in generated],
    }


def summarize(
    results: dict[str, dict[str, list]],
    references: dict[str, list[str]],
    retain_model_ratios: list[float] | None = None,
) -> dict[str, float]:
    """Return TOFU's metrics from :func:`evaluate_set` results of the four sets.

    Args:
        results: set name -> :func:`evaluate_set` output.
        references: set name -> the true answers, for ROUGE-L.
        retain_model_ratios: the retain-only model's forget truth ratios; None leaves
            forget quality out.
    """
    summary: dict[str, float] = {}
    scores: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        ratios = np.asarray(result["truth_ratio"])
        if name in ("forget", "retain"):
            probability = metrics.answer_probability(result["true_loss"])
        else:
            probability = metrics.relative_answer_probability(
                result["true_loss"], result["perturbed_loss"]
            )
        truth_ratio = (
            metrics.forget_truth_ratio(ratios)
            if name == "forget"
            else metrics.utility_truth_ratio(ratios)
        )
        rouge = metrics.rouge_l_recall(result["generated"], references[name])
        scores[name] = {"probability": probability, "rouge": rouge, "truth_ratio": truth_ratio}
        for metric, value in scores[name].items():
            summary[f"tofu/{name}/{metric}"] = value
    if all(name in scores for name in metrics.UTILITY_SETS):
        summary["tofu/model_utility"] = metrics.model_utility(scores)
    if retain_model_ratios is not None and "forget" in results:
        ratios = results["forget"]["truth_ratio"]
        if len(ratios) != len(retain_model_ratios):
            raise ValueError(
                f"retain_model_results has {len(retain_model_ratios)} forget truth ratios but "
                f"this evaluation has {len(ratios)}; evaluate both models on the same forget "
                "file with the same questions_per_set."
            )
        summary["tofu/forget_quality"] = metrics.forget_quality(
            np.asarray(ratios), np.asarray(retain_model_ratios)
        )
    return summary


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


class TofuEvaluation(pl.Callback):
    """Evaluate the module on TOFU after ``fit`` and on every ``validate`` call.

    Runs on the global-zero process only. Under FSDP or DeepSpeed each process holds
    only a shard of the parameters, so the end-of-fit evaluation is skipped with a
    warning and ``validate`` raises. Evaluate the export on one device instead. The module must be a
    :class:`lightning_modules.causal_lm.CausalLM` (or subclass).

    Args:
        forget_file: forget questions (``forget01_perturbed.json``); None skips the set.
        retain_file: retain questions (``retain_perturbed.json``); None skips the set.
        real_authors_file: ``real_authors_perturbed.json``; None skips the set.
        world_facts_file: ``world_facts_perturbed.json``; None skips the set.
        questions_per_set: ``{set: n}``: evaluate at most n questions of that set, spread
            over its file (see :func:`read_tofu_questions`); sets not named are evaluated
            whole.
        retain_model_results: the JSON this evaluation wrote for the model fine-tuned
            without the forget set; enables forget quality.
        output_file: where to write the results; default ``<run directory>/tofu_eval.json``.
        batch_size: sequences per forward pass and prompts per generation call.
        max_new_tokens: length limit of the greedy answers.
    """

    def __init__(
        self,
        forget_file: str | None = None,
        retain_file: str | None = None,
        real_authors_file: str | None = None,
        world_facts_file: str | None = None,
        questions_per_set: dict[str, int] | None = None,
        retain_model_results: str | None = None,
        output_file: str | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 64,
    ):
        self.files = {
            "forget": forget_file,
            "retain": retain_file,
            "real_authors": real_authors_file,
            "world_facts": world_facts_file,
        }
        if all(path is None for path in self.files.values()):
            raise ValueError(
                "TofuEvaluation needs at least one of forget_file, retain_file, "
                "real_authors_file and world_facts_file; all four are None."
            )
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(
                f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be at least 1."
            )
        unknown = sorted(set(questions_per_set or {}) - set(SETS))
        if unknown:
            raise ValueError(
                f"questions_per_set names unknown sets {unknown}; use some of {list(SETS)}."
            )
        self.questions_per_set = dict(questions_per_set or {})
        self.retain_model_results = retain_model_results
        self.output_file = output_file
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.summary: dict[str, float] = {}
        self._sharded = False

    def _retain_model_forget(self) -> dict[str, list] | None:
        """Return the retain model's per-question forget results, or None without them."""
        if self.retain_model_results is None:
            return None
        path = Path(self.retain_model_results)
        if not path.is_file():
            raise FileNotFoundError(
                f"retain_model_results {path} not found; run this evaluation on the model "
                "fine-tuned without the forget set first, and give its tofu_eval.json."
            )
        try:
            forget = json.loads(path.read_text(encoding="utf-8"))["per_question"]["forget"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path} is not a TofuEvaluation output with the forget set: {error!r}."
            ) from error
        missing = {"truth_ratio", "question"} - set(forget)
        if missing:
            raise ValueError(
                f"{path}: per_question.forget lacks {sorted(missing)}; rerun the evaluation "
                "of the retain model with this version of TofuEvaluation."
            )
        return forget

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Checked before training, so that a wrong path does not surface after the run.
        self._retain_model_forget()
        # The evaluation calls the model on the global-zero process alone, which works
        # under DDP but not with parameters sharded over processes.
        strategy = type(trainer.strategy).__name__
        self._sharded = "FSDP" in strategy or "DeepSpeed" in strategy
        if self._sharded and stage == "validate":
            raise ValueError(
                f"TofuEvaluation runs the model on one process and does not support "
                f"{strategy}; validate the exported model with a single-device strategy."
            )
        if self._sharded:
            log.warning(
                "TofuEvaluation is skipped at the end of this %s fit; evaluate the exported "
                "model with `train.py validate` on one device (--trainer.limit_val_batches 1).",
                strategy,
            )

    def evaluate(self, trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, float]:
        """Run the evaluation, write and log the results, and return the metrics."""
        retain_model = self._retain_model_forget()
        results, references = {}, {}
        for name, path in self.files.items():
            if path is None:
                continue
            questions = read_tofu_questions(path, self.questions_per_set.get(name))
            results[name] = evaluate_set(module, questions, self.batch_size, self.max_new_tokens)
            results[name]["question"] = [question.question for question in questions]
            references[name] = [question.answer for question in questions]
        if retain_model is not None and "forget" in results:
            if retain_model["question"] != results["forget"]["question"]:
                raise ValueError(
                    f"retain_model_results {self.retain_model_results} was computed on other "
                    "forget questions; evaluate both models on the same forget file with the "
                    "same questions_per_set."
                )
        retain_model_ratios = None if retain_model is None else retain_model["truth_ratio"]
        self.summary = summarize(results, references, retain_model_ratios)
        path = (
            Path(self.output_file)
            if self.output_file
            else run_directory(trainer) / "tofu_eval.json"
        )
        _write_json(
            path,
            {"step": trainer.global_step, "metrics": self.summary, "per_question": results},
        )
        for logger in trainer.loggers:
            logger.log_metrics(self.summary, step=trainer.global_step)
        rows = [
            [name, question, reference, answer]
            for name, result in results.items()
            for question, reference, answer in zip(
                result["question"], references[name], result["generated"], strict=True
            )
        ]
        log_table(trainer, "tofu/answers", ["set", "question", "answer", "generated"], rows)
        shown = "  ".join(f"{key}={value:.4f}" for key, value in self.summary.items())
        log.info("TOFU evaluation at step %d (%s): %s", trainer.global_step, path, shown)
        return self.summary

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not self._sharded:
            self.evaluate(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            if trainer.is_global_zero:
                self.evaluate(trainer, pl_module)
