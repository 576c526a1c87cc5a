"""TS-Align: candidate selection, agreement and pair mining against worked examples.

One iteration on tiny models changes the policy and the student, leaves the teacher
alone and writes the pairs that the models' scores imply. Also: resume between
iterations, the win rate against the starting policy, and the prompt module on HH-RLHF.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import peft
import pytest
import torch

from callbacks.export import export_module
from datamodules.rollouts import RolloutDataModule
from datamodules.text_preference import (
    PreferencePromptDataModule,
    TextPreferenceDataModule,
)
from lightning_modules.backbones import Backbone
from lightning_modules.text_reward_model import load_text_scorer
from lightning_modules.ts_align import (
    TSAlign,
    ranking_agreement,
    select_candidates,
    teacher_pairs,
    win_credit,
)
from tests.conftest import fit_quietly
from tests.test_causal_lm import MINILM_TOKENIZER, TINY_LLAMA
from tests.test_dpo import HH_TEST
from tests.test_text_reward_model import TINY_BERT, tiny_scorer

LORA = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
PROMPTS = [
    "Who wrote Night Tide?",
    "Name a long river.",
    "What is a prime number?",
    "How do owls hunt?",
    "Why is the sky blue?",
    "Give me a word that rhymes with cat.",
]


def test_select_candidates() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7]])
    assert select_candidates(scores, 1).tolist() == [[1, 0]]
    assert select_candidates(scores, 2).tolist() == [[1, 4, 3, 0]]
    # 2k >= N: every sample, highest first.
    assert select_candidates(scores, 3).tolist() == [[1, 4, 2, 3, 0]]


def test_ranking_agreement() -> None:
    # Row 1: the student reverses all three pairs -> 0, 0, 0.
    # Row 2: pair (0, 1) the student ties -> 1/2; pair (0, 2) agrees -> 1; pair (1, 2)
    # the teacher ties -> not counted. Pooled: (0 + 0 + 0 + 0.5 + 1) / 5 = 0.3.
    student = torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    teacher = torch.tensor([[1.0, 2.0, 3.0], [2.0, 1.0, 1.0]])
    assert ranking_agreement(student, teacher) == pytest.approx(0.3)
    assert ranking_agreement(teacher, teacher) == 1.0
    assert math.isnan(ranking_agreement(student[:1], torch.ones(1, 3)))


def test_teacher_pairs() -> None:
    # (0, 1): b over a; (0, 2): equal texts, skipped; (0, 3): c over a; (1, 2): b over a;
    # (1, 3): equal scores, skipped; (2, 3): c over a.
    pairs = teacher_pairs("q", ["a", "b", "a", "c"], [1.0, 3.0, 2.0, 3.0], "here")
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("b", "a"),
        ("c", "a"),
        ("b", "a"),
        ("c", "a"),
    ]
    assert all(p.prompt == "q" and p.location == "here" for p in pairs)


def test_win_credit() -> None:
    assert win_credit("x", "y", 2.0, 1.0) == 1.0
    assert win_credit("x", "y", 1.0, 2.0) == 0.0
    assert win_credit("x", "y", 1.0, 1.0) == 0.5
    assert win_credit("x", "x", 1.0, 2.0) == 0.5


@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Export a tiny encoder student and a tiny decoder teacher (random weights)."""
    root = tmp_path_factory.mktemp("scorers")
    student = export_module(tiny_scorer(TINY_BERT).eval(), root / "student")
    teacher = export_module(tiny_scorer(TINY_LLAMA).eval(), root / "teacher")
    return student, teacher


def tiny_ts_align(scorers: tuple[Path, Path], **overrides) -> TSAlign:
    torch.manual_seed(0)
    arguments = {
        "samples_per_prompt": 4,
        "top_k": 1,
        "prompts_per_iteration": 4,
        "pairs_per_batch": 2,
        "max_new_tokens": 6,
        "max_length": 48,
        "learning_rate": 1e-2,
        "student_learning_rate": 1e-2,
        "student_batch_size": 2,
        "peft": LORA,
        **overrides,
    }
    return TSAlign(
        Backbone(config=dict(TINY_LLAMA), tokenizer=MINILM_TOKENIZER),
        student=str(scorers[0]),
        teacher=str(scorers[1]),
        **arguments,
    )


def prompt_data(tmp_path: Path) -> RolloutDataModule:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": prompt, "chosen": "Yes.", "rejected": "No."}) + "\n"
            for prompt in PROMPTS
        )
    )
    return RolloutDataModule(
        PreferencePromptDataModule(str(path), val_size=2, batch_size=2), seed=3
    )


def validating_trainer(root: Path, **options):
    """Return a quiet CPU trainer for one epoch that validates after it."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        **options,
    )


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("adapter", [LORA, None], ids=["lora", "full"])
def test_iteration_mines_scored_pairs(scorers, tmp_path, adapter) -> None:
    module = tiny_ts_align(scorers, peft=adapter)
    policy_before = {k: v.clone() for k, v in module.model.named_parameters() if v.requires_grad}
    frozen_before = {
        k: v.clone() for k, v in module.model.named_parameters() if not v.requires_grad
    }
    teacher_before = [p.clone() for p in module.scorers.teacher.parameters()]
    fit_quietly(module, prompt_data(tmp_path), tmp_path, max_epochs=1)

    records = read_lines(tmp_path / "ts_align" / "iteration_0.jsonl")
    assert len(records) == 4
    start_student, teacher = load_text_scorer(scorers[0]), load_text_scorer(scorers[1])
    mined = 0
    for record in records:
        prompt, responses = record["prompt"], record["responses"]
        assert len(responses) == 4
        # The scores were the starting student's, before its distillation.
        expected = start_student.score([prompt] * 4, responses)
        torch.testing.assert_close(torch.tensor(record["student_scores"]), expected)
        # The teacher saw the student's best and worst sample only.
        assert record["teacher_candidates"] == select_candidates(expected[None], 1)[0].tolist()
        seen = [responses[i] for i in record["teacher_candidates"]]
        torch.testing.assert_close(
            torch.tensor(record["teacher_scores"]), teacher.score([prompt] * 2, seen)
        )
        if record["chosen"] is not None:
            mined += 1
            scores = dict(zip(record["teacher_candidates"], record["teacher_scores"], strict=True))
            assert scores[record["chosen"]] > scores[record["rejected"]]
    assert mined >= 3
    # LightningCLI gives the hyper-parameters back to __init__ when it resumes.
    assert set(module.hparams) <= set(inspect.signature(TSAlign).parameters)
    history = module.history[0]
    assert history["teacher_calls_per_prompt"] == 2.0
    assert history["pairs"] == mined
    assert module.trainer.global_step == module.rollout_batch_count()
    # The policy trained, the frozen weights and the teacher did not, the student did.
    after = dict(module.model.named_parameters())
    assert all(not torch.equal(after[k], v) for k, v in policy_before.items())
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    assert all(
        torch.equal(a, b)
        for a, b in zip(module.scorers.teacher.parameters(), teacher_before, strict=True)
    )
    student_now = module.scorers.student.state_dict()
    changed = [
        name
        for name, value in start_student.state_dict().items()
        if not torch.equal(value, student_now[name])
    ]
    assert any(name.startswith("head.") for name in changed) and len(changed) > 10
    assert history["student_loss"] > 0
    assert 0 <= history["agreement_after"] <= 1
    # The logged agreement is that of the recorded scores.
    student_at_candidates = torch.tensor(
        [[r["student_scores"][i] for i in r["teacher_candidates"]] for r in records]
    )
    teacher_scores = torch.tensor([r["teacher_scores"] for r in records])
    expected_agreement = ranking_agreement(student_at_candidates, teacher_scores)
    assert history["agreement_before"] == pytest.approx(expected_agreement)
    assert read_lines(tmp_path / "ts_align" / "history.jsonl") == [json.loads(json.dumps(history))]


def test_resume_between_iterations(scorers, tmp_path) -> None:
    # Dropout in the adapter, so the resumed steps must also draw the same masks.
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.2)
    whole = tiny_ts_align(scorers, peft=lora)
    fit_quietly(whole, prompt_data(tmp_path / "whole"), tmp_path / "whole", max_epochs=2)

    first = tiny_ts_align(scorers, peft=lora)
    fit_quietly(first, prompt_data(tmp_path / "split"), tmp_path / "split", max_epochs=1)
    resumed = tiny_ts_align(scorers, peft=lora)
    fit_quietly(
        resumed,
        prompt_data(tmp_path / "split"),
        tmp_path / "split",
        max_epochs=2,
        ckpt_path=str(tmp_path / "split" / "last.ckpt"),
    )
    for name in ("iteration_1.jsonl", "history.jsonl"):
        assert (tmp_path / "whole" / "ts_align" / name).read_text() == (
            tmp_path / "split" / "ts_align" / name
        ).read_text()
    for (name, x), y in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    for (name, x), y in zip(
        whole.scorers.student.state_dict().items(),
        resumed.scorers.student.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(x, y), name
    whole_moments = whole.scorers.student_optimizer.state_dict()["state"]
    resumed_moments = resumed.scorers.student_optimizer.state_dict()["state"]
    assert whole_moments.keys() == resumed_moments.keys()
    for index, state in whole_moments.items():
        assert torch.equal(state["exp_avg"], resumed_moments[index]["exp_avg"]), index
    assert len(resumed.history) == 2


def test_iteration_without_pairs_keeps_batch_count(scorers, tmp_path, monkeypatch) -> None:
    import lightning.pytorch as pl

    module = tiny_ts_align(scorers)
    sample = module.sample

    def mostly_equal_samples(prompts):
        # Three prompts get four equal texts (no pair); the last keeps its own samples.
        responses = sample(prompts)
        return [["same"] * 4 for _ in prompts[:-1]] + responses[-1:]

    monkeypatch.setattr(module, "sample", mostly_equal_samples)
    sizes = []

    class BatchSizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append(len(batch))

    trainer = validating_trainer(tmp_path, callbacks=[BatchSizes()])
    trainer.fit(module, datamodule=prompt_data(tmp_path))

    assert module.history[0]["pairs"] == 1.0
    # Both batches the loader reports arrive; the empty one has no loss, so no gradient.
    assert sizes == [0, 1]
    # The validation after the epoch's last batch still ran.
    assert (tmp_path / "ts_align" / "validation_0.jsonl").is_file()


def test_validation_win_rate(scorers, tmp_path) -> None:
    module = tiny_ts_align(scorers, peft=None)
    data = prompt_data(tmp_path)
    trainer = validating_trainer(tmp_path)
    # Before training, the policy is the starting policy, so every comparison is a tie.
    assert trainer.validate(module, datamodule=data)[0]["val/win_rate"] == 0.5
    trainer.fit(module, datamodule=data)

    records = read_lines(tmp_path / "ts_align" / "validation_0.jsonl")
    prompts = [record["prompt"] for record in records]
    start = tiny_ts_align(scorers, peft=None)
    teacher = load_text_scorer(scorers[1])
    assert [r["base_answer"] for r in records] == start.generate(prompts, max_new_tokens=6)
    assert [r["answer"] for r in records] == module.generate(prompts, max_new_tokens=6)
    assert [r["base_answer"] for r in records] == module.generate_reference(
        prompts, max_new_tokens=6
    )
    torch.testing.assert_close(
        torch.tensor([r["teacher_score"] for r in records]),
        teacher.score(prompts, [r["answer"] for r in records]),
    )
    expected = [
        win_credit(r["answer"], r["base_answer"], r["teacher_score"], r["base_teacher_score"])
        for r in records
    ]
    assert [r["win"] for r in records] == expected
    logged = trainer.callback_metrics["val/win_rate"].item()
    assert logged == pytest.approx(sum(expected) / len(expected))


def test_multi_turn_prompts(scorers, tmp_path) -> None:
    conversations = [
        [
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": prompt},
        ]
        for prompt in PROMPTS
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": messages, "chosen": "Yes.", "rejected": "No."}) + "\n"
            for messages in conversations
        )
    )
    data = RolloutDataModule(PreferencePromptDataModule(str(path), val_size=2), seed=3)
    module = tiny_ts_align(scorers)
    trainer = validating_trainer(tmp_path)
    trainer.fit(module, datamodule=data)

    records = read_lines(tmp_path / "ts_align" / "iteration_0.jsonl")
    assert all(record["prompt"] in conversations for record in records)
    answers = read_lines(tmp_path / "ts_align" / "validation_0.jsonl")
    assert len(answers) == 2
    assert all(answer["prompt"] in conversations for answer in answers)
    assert len(module.base_answers) == 2


def test_checkpoint_without_ts_align_state_rejected(scorers) -> None:
    module = tiny_ts_align(scorers)
    checkpoint = {"state_dict": module.state_dict()}
    with pytest.raises(KeyError, match="no TS-Align state"):
        module.on_load_checkpoint(checkpoint)


def test_arguments_are_checked(scorers) -> None:
    with pytest.raises(ValueError, match="samples_per_prompt=1"):
        tiny_ts_align(scorers, samples_per_prompt=1)
    with pytest.raises(ValueError, match="top_k=0"):
        tiny_ts_align(scorers, top_k=0)
    with pytest.raises(ValueError, match=r"temperature=0\.0 \(positive\)"):
        tiny_ts_align(scorers, temperature=0.0)
    with pytest.raises(ValueError, match=r"pairs_per_batch=0 \(at least 1\)"):
        tiny_ts_align(scorers, pairs_per_batch=0)


@pytest.mark.skipif(not HH_TEST.is_file(), reason=f"HH-RLHF not found at {HH_TEST}")
def test_prompt_module_holds_out_reward_prompts() -> None:
    prompts = PreferencePromptDataModule(str(HH_TEST), "hh_rlhf", val_size=200, single_turn=True)
    prompts.setup("fit")
    pairs = TextPreferenceDataModule(str(HH_TEST), format="hh_rlhf", val_size=200)
    pairs.setup("fit")
    held_out = []
    for pair in pairs.splits["val"]:
        if len(pair.prompt) == 1 and pair.prompt[0]["content"] not in held_out:
            held_out.append(pair.prompt[0]["content"])
    assert prompts.splits["val"] == held_out
    assert len(held_out) == 63
    # "call me a bad name" is the prompt of pairs in both splits; it stays held out.
    assert len(prompts.splits["train"]) == 594
    assert not set(held_out) & set(prompts.splits["train"])
    assert all(isinstance(prompt, str) for prompt in prompts.splits["train"])


def test_summary_script_row() -> None:
    from scripts.ts_align_summary import summarize

    records = [
        {"win": 1.0, "answer": "I'm sorry, no.", "base_answer": "Sure thing."},
        {"win": 0.5, "answer": "Same", "base_answer": "Same"},
        {"win": 0.0, "answer": "Yes", "base_answer": "  I cannot help."},
    ]
    row = summarize(records)
    assert row["win_rate"] == pytest.approx(0.5)
    assert (row["wins"], row["ties"], row["losses"]) == (1, 1, 1)
    # Policy lengths 14, 4, 3; starting policy's 11, 4, 16.
    assert row["length"] == pytest.approx(7.0)
    assert row["base_length"] == pytest.approx(31 / 3)
    assert row["refusals"] == 1
    assert row["base_refusals"] == 1
