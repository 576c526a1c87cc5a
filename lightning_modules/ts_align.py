"""TS-Align: DPO on preference pairs mined from the policy's own samples.

A cheap student reward model and an expensive teacher reward model label the policy's
responses, so no human labels are needed once the reward models are trained. One
Lightning epoch is one TS-Align iteration, so ``trainer.max_epochs`` is the number of
iterations. At the start of an epoch, for each of ``prompts_per_iteration`` prompts
drawn from the training prompts:

1. the policy samples N = ``samples_per_prompt`` responses;
2. the student scores all N;
3. the teacher scores only the student's top k and bottom k (k = ``top_k``), so it
   makes 2k calls per prompt instead of N;
4. the teacher's best and worst of those 2k become the chosen and the rejected
   response of a pair (no pair when the two texts are equal or the teacher ties them);
5. the student is trained with the Bradley-Terry loss on every pair of those 2k that
   the teacher orders, which distills the teacher's ranking into it;
6. the epoch's training batches are the mined pairs, on which :class:`DPO` trains the
   policy against the frozen starting policy. An epoch always has
   ceil(``prompts_per_iteration`` / ``pairs_per_batch``) batches (see
   :meth:`TSAlign.rollout_batches`).

The student is distilled in step 5, before the policy's DPO steps rather than after
them: the two updates are independent within an iteration, and this order puts the
distilled student in the checkpoint that Lightning writes after the epoch's validation.

Student-teacher agreement is the share of candidate pairs (i, j) of a prompt, among
those the teacher does not tie, that the student orders as the teacher does (a student
tie counts half), pooled over the iteration's prompts. It is measured on the teacher's
2k candidates before and after the distillation of step 5. The "before" value of an
iteration measures a student distilled on earlier iterations only, on new samples.

Logged per iteration under ``ts_align/``: ``agreement_before``, ``agreement_after``,
``teacher_calls_per_prompt``, ``teacher_reward`` (the mean teacher score of the
candidates it scored), ``student_loss`` (the distillation loss), ``pairs`` (the pairs
DPO trains on). Validation answers each held-out prompt greedily with the policy and
with the starting policy and logs, as judged by the teacher, ``val/win_rate`` (ties
count half), ``val/teacher_reward`` and ``val/base_teacher_reward``.

Files, in the ``ts_align/`` folder of the run directory: ``iteration_<epoch>.jsonl``
(per prompt: the N responses, the student's scores, the candidates the teacher scored
and its scores, the chosen and the rejected index), ``validation_<epoch>.jsonl`` (each
held-out prompt with both answers and their teacher scores) and ``history.jsonl`` (the
logged values of every iteration so far).

Resuming: checkpoints hold the student's weights and optimizer state, the history and
the starting policy's held-out answers. A run resumed from the checkpoint written at the
end of an iteration continues as the uninterrupted run would (sampling is seeded by
the iteration; see :mod:`datamodules.rollouts`). On a GPU the dropout masks may differ,
because the CUDA generator's state is not checkpointed. A checkpoint written during an
iteration resumes by sampling that iteration again with the already distilled student.

TS-Align runs in one process: the student would be distilled on each process's pairs
separately, so more than one process is rejected.

Notation: P prompts, N samples per prompt, m = min(N, 2k) teacher candidates.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import peft
import torch
from torch import Tensor

from callbacks.run_config import run_directory
from datamodules.jsonl import write_jsonl
from datamodules.text_preference import PreferencePair
from lightning_modules.adapters import BitFit
from lightning_modules.backbones import Backbone
from lightning_modules.causal_lm import Prompt
from lightning_modules.dpo import DPO
from lightning_modules.text_reward_model import TextRewardModel, load_text_scorer, pairwise_loss


def select_candidates(scores: Tensor, k: int) -> Tensor:
    """Return the [P, m] indices of each row's k highest then k lowest of [P, N] ``scores``.

    m = min(N, 2k); when 2k >= N every index is a candidate, highest score first. Equal
    scores keep their sample order.
    """
    order = scores.argsort(dim=1, descending=True, stable=True)  # [P, N]
    if 2 * k >= scores.shape[1]:
        return order
    return torch.cat([order[:, :k], order[:, -k:]], dim=1)


def ranking_agreement(student: Tensor, teacher: Tensor) -> float:
    """Return the share of candidate pairs the student orders as the teacher does.

    Both are [P, m] scores of the same candidates. Over every (i, j), i < j, of a row
    whose teacher scores differ: 1 when the student's difference has the same sign,
    1/2 when the student ties them, 0 otherwise. NaN when the teacher ties every pair.
    """
    first, second = torch.triu_indices(teacher.shape[1], teacher.shape[1], offset=1)
    teacher_sign = (teacher[:, first] - teacher[:, second]).sign()  # [P, pairs]
    student_sign = (student[:, first] - student[:, second]).sign()
    counted = teacher_sign != 0
    if not counted.any():
        return math.nan
    credit = torch.where(student_sign == 0, 0.5, (student_sign == teacher_sign).float())
    return credit[counted].mean().item()


def teacher_pairs(
    prompt: Prompt, texts: list[str], scores: list[float], location: str
) -> list[PreferencePair]:
    """Return every pair of ``texts`` that the teacher's ``scores`` order (higher first).

    Pairs of equal texts or equal scores are left out.
    """
    pairs = []
    for i, j in itertools.combinations(range(len(texts)), 2):
        if texts[i] == texts[j] or scores[i] == scores[j]:
            continue
        better, worse = (i, j) if scores[i] > scores[j] else (j, i)
        pairs.append(PreferencePair(prompt, texts[better], texts[worse], location))
    return pairs


def win_credit(policy_text: str, base_text: str, policy_score: float, base_score: float) -> float:
    """Return 1 for a win of the policy, 0 for a loss, 1/2 for equal texts or scores."""
    if policy_text == base_text or policy_score == base_score:
        return 0.5
    return float(policy_score > base_score)


@dataclass
class _Scorers:
    """The student and the teacher, held outside the module tree.

    The policy's optimizer takes the module's parameters, and neither scorer belongs in
    it: the teacher is frozen and the student has its own optimizer. The student's
    state goes into checkpoints by hand (see ``on_save_checkpoint``).
    """

    student: TextRewardModel
    teacher: TextRewardModel
    student_optimizer: torch.optim.Optimizer


class TSAlign(DPO):
    """Teacher-student preference mining with DPO (see the module docstring).

    Train with :class:`datamodules.rollouts.RolloutDataModule` around a prompt module
    such as :class:`datamodules.text_preference.PreferencePromptDataModule`.

    Args:
        model: the policy's starting point (``pretrained`` or ``config``).
        student: directory of an exported :class:`TextRewardModel` (it keeps training).
        teacher: directory of an exported :class:`TextRewardModel` (frozen).
        samples_per_prompt: N, responses sampled per prompt.
        top_k: k; the teacher scores the student's top k and bottom k.
        prompts_per_iteration: prompts drawn (with replacement) per iteration.
        pairs_per_batch: mined pairs per DPO step.
        max_new_tokens: maximum new tokens of a sampled response or a validation answer.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        generation_batch_size: prompts per ``generate`` call (each makes N rows).
        scorer_batch_size: sequences per reward-model forward pass.
        student_learning_rate: AdamW learning rate of the distillation.
        student_batch_size: pairs per distillation step.
        student_epochs: passes over an iteration's teacher pairs.
        teacher_dtype: parameter dtype of the teacher's backbone (``"bfloat16"`` for a
            large teacher on a GPU).
        loss, beta, label_smoothing, peft, max_length, learning_rate, weight_decay,
            export_merged: as for :class:`DPO`.
    """

    def __init__(
        self,
        model: Backbone,
        student: str,
        teacher: str,
        samples_per_prompt: int = 8,
        top_k: int = 2,
        prompts_per_iteration: int = 64,
        pairs_per_batch: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generation_batch_size: int = 8,
        scorer_batch_size: int = 16,
        student_learning_rate: float = 1e-5,
        student_batch_size: int = 16,
        student_epochs: int = 1,
        teacher_dtype: str = "float32",
        loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        peft: peft.PeftConfig | BitFit | None = None,
        max_length: int = 512,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        export_merged: bool = False,
    ):
        counts = {
            "samples_per_prompt": samples_per_prompt,
            "prompts_per_iteration": prompts_per_iteration,
            "pairs_per_batch": pairs_per_batch,
            "max_new_tokens": max_new_tokens,
            "generation_batch_size": generation_batch_size,
            "scorer_batch_size": scorer_batch_size,
            "student_batch_size": student_batch_size,
            "student_epochs": student_epochs,
        }
        invalid = [f"{name}={value} (at least 1)" for name, value in counts.items() if value < 1]
        if samples_per_prompt == 1:
            invalid.append("samples_per_prompt=1 (at least 2, to form a pair)")
        if top_k < 1:
            invalid.append(f"top_k={top_k} (at least 1)")
        if temperature <= 0:
            invalid.append(f"temperature={temperature} (positive)")
        if invalid:
            raise ValueError(f"Invalid TSAlign arguments: {', '.join(invalid)}.")
        super().__init__(
            model,
            loss=loss,
            beta=beta,
            label_smoothing=label_smoothing,
            peft=peft,
            max_length=max_length,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            export_merged=export_merged,
        )
        # LightningCLI passes a checkpoint's hyper-parameters back to __init__ on resume,
        # so they must be this class's arguments only. TSAlign makes its data as it
        # trains, so it has no precomputed reference.
        del self.hparams["precompute_reference"]
        student_model = load_text_scorer(student)
        teacher_model = load_text_scorer(teacher, teacher_dtype).requires_grad_(False)
        self.scorers = _Scorers(
            student_model,
            teacher_model,
            torch.optim.AdamW(student_model.parameters(), lr=student_learning_rate),
        )
        self.history: list[dict[str, float]] = []
        # Held-out prompt -> (starting policy's answer, its teacher score).
        self.base_answers: dict[str, tuple[str, float]] = {}
        self._iteration_values: dict[str, float] = {}
        self._validation_records: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ OnPolicyMethod

    def rollout_prompt_count(self) -> int:
        return self.hparams.prompts_per_iteration

    def rollout_batch_count(self) -> int:
        return math.ceil(self.hparams.prompts_per_iteration / self.hparams.pairs_per_batch)

    def rollout_batches(
        self, prompts: list[Prompt], generator: torch.Generator
    ) -> Iterator[list[PreferencePair]]:
        """Mine this iteration's pairs, distill the student, then yield the DPO batches.

        Exactly ``rollout_batch_count()`` batches come out, because Lightning validates
        after the number of batches the loader reports. When prompts give no pair (all
        candidates equal in text or in teacher score), the pairs are spread evenly over
        that many batches. A batch left empty (fewer pairs than batches) is yielded as an
        empty list, and its training step is skipped.
        """
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(seed)
            pairs = self.run_iteration(prompts, generator)
        count = self.rollout_batch_count()
        # Batch b takes pairs [b * len / count, (b + 1) * len / count).
        bounds = [len(pairs) * index // count for index in range(count + 1)]
        for start, end in itertools.pairwise(bounds):
            yield pairs[start:end]

    def _cuda_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    # ------------------------------------------------------------------ one iteration

    def sample(self, prompts: list[Prompt]) -> list[list[str]]:
        """Return N sampled responses per prompt, from the current policy."""
        hparams = self.hparams
        count, step = hparams.samples_per_prompt, hparams.generation_batch_size
        texts: list[str] = []
        with self.precision_context():
            for start in range(0, len(prompts), step):
                texts += self.generate(
                    prompts[start : start + step],
                    max_new_tokens=hparams.max_new_tokens,
                    do_sample=True,
                    temperature=hparams.temperature,
                    top_p=hparams.top_p,
                    num_return_sequences=count,
                )
        return [texts[row * count : (row + 1) * count] for row in range(len(prompts))]

    def _score(self, scorer: TextRewardModel, prompts: list[Prompt], texts: list[str]) -> Tensor:
        with self.precision_context():
            return scorer.score(prompts, texts, batch_size=self.hparams.scorer_batch_size)

    def run_iteration(
        self, prompts: list[Prompt], generator: torch.Generator
    ) -> list[PreferencePair]:
        """Steps 1-5 of the module docstring; returns the pairs for DPO (step 6)."""
        if self.trainer.world_size > 1:
            raise RuntimeError(
                f"TSAlign runs in one process, but this trainer has {self.trainer.world_size} "
                "processes; set trainer.devices and trainer.num_nodes to 1 (each process "
                "would distill its own copy of the student)."
            )
        hparams = self.hparams
        student, teacher = self.scorers.student, self.scorers.teacher
        count = hparams.samples_per_prompt
        responses = self.sample(prompts)  # [P][N]
        flat = [text for texts in responses for text in texts]
        repeated = [prompt for prompt in prompts for _ in range(count)]
        student_scores = self._score(student, repeated, flat).view(len(prompts), count)
        candidates = select_candidates(student_scores, hparams.top_k)  # [P, m]
        candidate_texts = [
            [responses[row][i] for i in indices] for row, indices in enumerate(candidates.tolist())
        ]
        width = candidates.shape[1]
        candidate_prompts = [prompt for prompt in prompts for _ in range(width)]
        candidate_flat = [text for texts in candidate_texts for text in texts]
        teacher_scores = self._score(teacher, candidate_prompts, candidate_flat)
        teacher_scores = teacher_scores.view(len(prompts), width)
        agreement_before = ranking_agreement(student_scores.gather(1, candidates), teacher_scores)

        epoch = self.current_epoch
        dpo_pairs, distill_pairs, records = [], [], []
        for row, prompt in enumerate(prompts):
            location = f"iteration {epoch}, prompt {row}"
            texts, scores = candidate_texts[row], teacher_scores[row].tolist()
            best, worst = (
                max(range(width), key=scores.__getitem__),
                min(range(width), key=scores.__getitem__),
            )
            mined = texts[best] != texts[worst] and scores[best] != scores[worst]
            if mined:
                dpo_pairs.append(PreferencePair(prompt, texts[best], texts[worst], location))
            distill_pairs += teacher_pairs(prompt, texts, scores, location)
            indices = candidates[row].tolist()
            records.append(
                {
                    "prompt": prompt,
                    "responses": responses[row],
                    "student_scores": student_scores[row].tolist(),
                    "teacher_candidates": indices,
                    "teacher_scores": scores,
                    "chosen": indices[best] if mined else None,
                    "rejected": indices[worst] if mined else None,
                }
            )
        self._write(f"iteration_{epoch}.jsonl", records)

        student_loss = self.distill(distill_pairs, generator)
        student_after = self._score(student, candidate_prompts, candidate_flat)
        student_after = student_after.view(len(prompts), width)
        self._iteration_values = {
            "agreement_before": agreement_before,
            "agreement_after": ranking_agreement(student_after, teacher_scores),
            "teacher_calls_per_prompt": float(width),
            "teacher_reward": teacher_scores.mean().item(),
            "student_loss": student_loss,
            "pairs": float(len(dpo_pairs)),
        }
        return dpo_pairs

    def distill(self, pairs: list[PreferencePair], generator: torch.Generator) -> float:
        """Train the student on the teacher's ``pairs``; return the mean loss (NaN if none)."""
        hparams = self.hparams
        student, optimizer = self.scorers.student, self.scorers.student_optimizer
        losses = []
        student.train()
        try:
            with torch.enable_grad():
                for _ in range(hparams.student_epochs):
                    order = torch.randperm(len(pairs), generator=generator).tolist()
                    size = hparams.student_batch_size
                    for start in range(0, len(order), size):
                        batch = [pairs[i] for i in order[start : start + size]]
                        with self.precision_context():
                            chosen, rejected = student.pair_scores(batch)
                        loss = pairwise_loss(chosen.float(), rejected.float())
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        losses.append(loss.item())
        finally:
            optimizer.zero_grad(set_to_none=True)
            student.eval()
        return sum(losses) / len(losses) if losses else math.nan

    def _write(self, name: str, records: list[dict[str, Any]]) -> None:
        write_jsonl(run_directory(self.trainer) / "ts_align" / name, records)

    # ------------------------------------------------------------------ Lightning

    def precision_context(self) -> Any:
        """Return the trainer's autocast context (none outside a trainer)."""
        if self._trainer is None:
            return contextlib.nullcontext()
        return self.trainer.precision_plugin.forward_context()

    def _move_scorers(self) -> None:
        # Validation hooks run under inference mode, where a move would turn the
        # student's weights into inference tensors that distillation cannot train.
        with torch.inference_mode(False):
            self.scorers.student.to(self.device)
            self.scorers.teacher.to(self.device)
        # Optimizer state loaded from a checkpoint stays where it was loaded; AdamW keeps
        # its step counters on the CPU.
        for state in self.scorers.student_optimizer.state.values():
            for name, value in state.items():
                if torch.is_tensor(value) and name != "step":
                    state[name] = value.to(self.device)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._move_scorers()

    def on_validation_start(self) -> None:
        self._move_scorers()

    def on_train_epoch_end(self) -> None:
        values = self._iteration_values
        if not values:
            return
        for name, value in values.items():
            self.log(f"ts_align/{name}", value)
        self.history.append({"iteration": self.current_epoch, **values})
        self._write("history.jsonl", self.history)
        self._iteration_values = {}

    def training_step(self, pairs: list[PreferencePair], batch_index: int) -> Tensor | None:
        if not pairs:
            return None  # see rollout_batches
        return super().training_step(pairs, batch_index)

    @staticmethod
    def _key(prompt: Prompt) -> str:
        return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)

    def validation_step(self, prompts: list[Prompt], batch_index: int) -> None:
        hparams = self.hparams
        teacher = self.scorers.teacher
        missing = [prompt for prompt in prompts if self._key(prompt) not in self.base_answers]
        if missing:
            with self.precision_context():
                answers = self.generate_reference(missing, max_new_tokens=hparams.max_new_tokens)
            scores = self._score(teacher, missing, answers).tolist()
            for prompt, answer, score in zip(missing, answers, scores, strict=True):
                self.base_answers[self._key(prompt)] = (answer, score)
        with self.precision_context():
            answers = self.generate(prompts, max_new_tokens=hparams.max_new_tokens)
        scores = self._score(teacher, prompts, answers).tolist()
        credits, base_scores = [], []
        for prompt, answer, score in zip(prompts, answers, scores, strict=True):
            base_answer, base_score = self.base_answers[self._key(prompt)]
            credits.append(win_credit(answer, base_answer, score, base_score))
            base_scores.append(base_score)
            self._validation_records.append(
                {
                    "prompt": prompt,
                    "answer": answer,
                    "teacher_score": score,
                    "base_answer": base_answer,
                    "base_teacher_score": base_score,
                    "win": credits[-1],
                }
            )
        size = len(prompts)
        for name, values in (
            ("win_rate", credits),
            ("teacher_reward", scores),
            ("base_teacher_reward", base_scores),
        ):
            self.log(
                f"val/{name}", sum(values) / size, prog_bar=name == "win_rate", batch_size=size
            )

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self._validation_records:
            self._write(f"validation_{self.current_epoch}.jsonl", self._validation_records)
        self._validation_records = []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ts_align"] = {
            "student": self.scorers.student.state_dict(),
            "student_optimizer": self.scorers.student_optimizer.state_dict(),
            "history": self.history,
            "base_answers": self.base_answers,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "ts_align" not in checkpoint:
            raise KeyError(
                "this checkpoint has no TS-Align state (student weights, history); it was "
                "not written by TSAlign. Start from a DPO or causal-LM checkpoint by "
                "exporting its model and giving that directory as model.pretrained."
            )
        state = checkpoint["ts_align"]
        self.scorers.student.load_state_dict(state["student"])
        self.scorers.student_optimizer.load_state_dict(state["student_optimizer"])
        self.history = list(state["history"])
        self.base_answers = {key: tuple(value) for key, value in state["base_answers"].items()}
