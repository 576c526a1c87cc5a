"""TOFU evaluation: reading the perturbed files, per-question answer losses, greedy answers,
the metric summary on a worked example, and the callback inside a Lightning run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy.stats import hmean

from callbacks.tofu import (
    TofuEvaluation,
    answer_losses,
    evaluate_set,
    read_tofu_questions,
    summarize,
)
from datamodules.prompt_response import (
    PromptResponse,
    PromptResponseDataModule,
    read_prompt_response,
)
from tests.test_causal_lm import tiny_model

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
requires_tofu = pytest.mark.skipif(
    not TOFU_DIR.is_dir(), reason=f"TOFU data not found at {TOFU_DIR}"
)


def write_perturbed(path: Path, count: int, paraphrase: bool = True) -> Path:
    """Write ``count`` small TOFU-style records as one JSON array on one line."""
    rows = []
    for index in range(count):
        row = {
            "question": f"Who wrote book {index}?",
            "answer": f"Author {index} wrote it.",
            "perturbed_answer": [f"Nobody {index}.", f"Someone else {index}."],
        }
        if paraphrase:
            row["paraphrased_answer"] = f"It was written by author {index}."
        rows.append(row)
    path.write_text(json.dumps(rows) + "\n")
    return path


@requires_tofu
def test_reads_the_tofu_files() -> None:
    forget = read_tofu_questions(TOFU_DIR / "forget01_perturbed.json")
    assert len(forget) == 40 and {len(q.perturbed) for q in forget} == {5}
    assert forget[0].base_answer != forget[0].answer  # the paraphrase
    real = read_tofu_questions(TOFU_DIR / "real_authors_perturbed.json")
    assert len(real) == 100 and {len(q.perturbed) for q in real} == {3}
    assert all(q.base_answer == q.answer for q in real)  # no paraphrase in this set
    every = read_tofu_questions(TOFU_DIR / "retain_perturbed.json")
    spread = read_tofu_questions(TOFU_DIR / "retain_perturbed.json", limit=40)
    # 400 questions about 20 authors, 20 each: every tenth keeps two per author.
    assert [q.question for q in spread] == [q.question for q in every[::10]]


def test_bad_perturbed_answers_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"question": "q?", "answer": "a.", "perturbed_answer": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.json:1: field 'perturbed_answer'"):
        read_tofu_questions(path)


def test_answer_loss_is_token_mean() -> None:
    module = tiny_model().eval()
    prompt, answer = "Who wrote it?", "Jane did."
    prompt_ids, answer_ids = module._prompt_response_ids(PromptResponse(prompt, answer, ""))
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        log_probs = module.model(input_ids=ids).logits[0].log_softmax(-1)
    # Position t predicts token t + 1; the answer starts at len(prompt_ids).
    expected = -np.mean(
        [
            log_probs[position - 1, ids[0, position]].item()
            for position in range(len(prompt_ids), ids.shape[1])
        ]
    )
    prompts = [prompt, "A much longer question about the same book?", "Why?"]
    answers = [answer, "Because it was long.", "No reason at all, really."]
    together = answer_losses(module, prompts, answers, batch_size=3)
    one_by_one = answer_losses(module, prompts, answers, batch_size=1)
    assert together[0] == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5)


def test_batched_greedy_answers_match_single_prompts() -> None:
    module = tiny_model()
    prompts = ["Who wrote it?", "When was the longer question about the book asked?"]
    together = module.generate(prompts, max_new_tokens=6)
    alone = [module.generate([prompt], max_new_tokens=6)[0] for prompt in prompts]
    assert together == alone
    assert module.model.training  # the training mode is restored
    # Greedy decoding by hand: append the argmax token six times.
    ids = torch.tensor([module.prompt_ids(prompts[0])])
    with torch.no_grad():
        for _ in range(6):
            next_id = module.model(input_ids=ids).logits[0, -1].argmax()
            if next_id.item() == module.end_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    start = len(module.prompt_ids(prompts[0]))
    assert together[0] == module.tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_summary_worked_example() -> None:
    ln = math.log
    results = {
        # exp(-loss) = 1/2 and 1/4: probability 3/8. Truth ratios R = exp(mean perturbed
        # - base) = exp(ln 2) = 2 and exp(-ln 2) = 1/2: min(R, 1/R) = 1/2 for both.
        "forget": {
            "true_loss": [ln(2), ln(4)],
            "base_loss": [ln(2), ln(4)],
            "perturbed_loss": [[ln(4), ln(4)], [ln(2), ln(2)]],
            "generated": ["a b c d", "x"],
        },
        # Probability 1/2; R = 4 and 2: mean(1 - 1/R) = (3/4 + 1/2) / 2 = 5/8.
        "retain": {
            "true_loss": [ln(2), ln(2)],
            "base_loss": [0.0, 0.0],
            "perturbed_loss": [[ln(4)], [ln(2)]],
            "generated": ["a b", "c d"],
        },
        # Relative probability: (1/2) / (1/2 + 1/4 + 1/4) = 1/2. R = 2: 1 - 1/2 = 1/2.
        "real_authors": {
            "true_loss": [ln(2)],
            "base_loss": [ln(2)],
            "perturbed_loss": [[ln(4), ln(4)]],
            "generated": ["m n"],
        },
        # Relative probability (1/2) / (1/2 + 1) = 1/3; R = 1/2: max(0, 1 - 2) = 0.
        "world_facts": {
            "true_loss": [ln(2)],
            "base_loss": [ln(2)],
            "perturbed_loss": [[0.0]],
            "generated": ["p"],
        },
    }
    for result in results.values():
        ratios = np.exp(np.mean(result["perturbed_loss"], axis=1) - result["base_loss"])
        result["truth_ratio"] = ratios.tolist()
    references = {
        "forget": ["a b", "y z"],  # recalls 1 and 0
        "retain": ["a b", "c d e f"],  # recalls 1 and 1/2
        "real_authors": ["m n"],  # recall 1
        "world_facts": ["p q r s"],  # recall 1/4
    }
    retain_model = [2.0, 0.5]  # the same truth ratios: KS statistic 0, p-value 1
    summary = summarize(results, references, retain_model)
    expected = {
        "tofu/forget/probability": 3 / 8,
        "tofu/forget/truth_ratio": 1 / 2,
        "tofu/forget/rouge": 1 / 2,
        "tofu/retain/probability": 1 / 2,
        "tofu/retain/truth_ratio": 5 / 8,
        "tofu/retain/rouge": 3 / 4,
        "tofu/real_authors/probability": 1 / 2,
        "tofu/real_authors/truth_ratio": 1 / 2,
        "tofu/real_authors/rouge": 1.0,
        "tofu/world_facts/probability": 1 / 3,
        "tofu/world_facts/truth_ratio": 0.0,
        "tofu/world_facts/rouge": 1 / 4,
        "tofu/forget_quality": 1.0,
        # One utility number is 0, so the harmonic mean is 0.
        "tofu/model_utility": 0.0,
    }
    assert summary == pytest.approx(expected)
    results["world_facts"]["truth_ratio"] = [4.0]  # 1 - 1/4 = 3/4
    summary = summarize(results, references, None)
    utility = hmean([1 / 2, 3 / 4, 5 / 8, 1 / 2, 1.0, 1 / 2, 1 / 3, 1 / 4, 3 / 4])
    assert summary["tofu/model_utility"] == pytest.approx(utility)
    assert "tofu/forget_quality" not in summary
    with pytest.raises(ValueError, match="same forget file"):
        summarize(results, references, [1.0])


def test_callback_writes_results_after_fit_and_validate(tmp_path: Path) -> None:
    forget = write_perturbed(tmp_path / "forget.json", 3)
    general = write_perturbed(tmp_path / "general.json", 2, paraphrase=False)
    train = tmp_path / "train.jsonl"
    train.write_text(
        "\n".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}."}) for i in range(4)) + "\n"
    )
    files = {
        "forget_file": str(forget),
        "retain_file": str(forget),
        "real_authors_file": str(general),
        "world_facts_file": str(general),
    }
    first = tmp_path / "retain_model.json"
    callback = TofuEvaluation(**files, output_file=str(first), max_new_tokens=4)
    module = tiny_model()
    data = PromptResponseDataModule(str(train), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=data)
    written = json.loads(first.read_text())
    assert written["step"] == 2
    assert len(written["per_question"]["forget"]["truth_ratio"]) == 3
    assert "tofu/model_utility" in written["metrics"]
    assert "tofu/forget_quality" not in written["metrics"]
    # The written answers and losses are those of the trained model.
    questions = read_tofu_questions(forget)
    direct = evaluate_set(module, questions, batch_size=16, max_new_tokens=4)
    forget_results = written["per_question"]["forget"]
    assert forget_results["generated"] == direct["generated"]
    np.testing.assert_allclose(forget_results["true_loss"], direct["true_loss"])
    # The truth ratio compares the paraphrased answer (not the true one) with the perturbed.
    base, true = np.array(forget_results["base_loss"]), np.array(forget_results["true_loss"])
    assert np.abs(base - true).min() > 1e-4
    expected = np.exp(np.mean(forget_results["perturbed_loss"], axis=1) - base)
    np.testing.assert_allclose(forget_results["truth_ratio"], expected, rtol=1e-6)
    base_answer = answer_losses(module, [questions[0].question], [questions[0].base_answer], 1)
    assert base[0] == pytest.approx(base_answer[0], rel=1e-5)

    # Against its own truth ratios the forget quality is 1; validate runs the evaluation.
    second = tmp_path / "again.json"
    callback = TofuEvaluation(
        **files, output_file=str(second), retain_model_results=str(first), max_new_tokens=4
    )
    data = PromptResponseDataModule(str(train), val_file=str(train), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.validate(module, datamodule=data)
    assert json.loads(second.read_text())["metrics"]["tofu/forget_quality"] == pytest.approx(1.0)

    # Results of another forget file are rejected, though the question count matches.
    other = write_perturbed(tmp_path / "other.json", 3)
    other.write_text(other.read_text().replace("book", "novel"))
    callback = TofuEvaluation(
        forget_file=str(other), retain_model_results=str(first), max_new_tokens=4
    )
    with pytest.raises(ValueError, match="other forget questions"):
        callback.evaluate(trainer, module)


def test_missing_retain_model_results_is_explained(tmp_path: Path) -> None:
    forget = write_perturbed(tmp_path / "forget.json", 2)
    callback = TofuEvaluation(forget_file=str(forget), retain_model_results="none.json")
    with pytest.raises(FileNotFoundError, match="fine-tuned without the forget set"):
        callback.evaluate(pl.Trainer(logger=False), tiny_model())


@requires_tofu
def test_subset_protocol_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "soul_tofu", Path(__file__).resolve().parents[1] / "scripts" / "soul_tofu.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.prepare(TOFU_DIR, tmp_path, authors=8)
    full = read_prompt_response(TOFU_DIR / "full.json")
    finetune = read_prompt_response(tmp_path / "finetune.json")
    retain = read_prompt_response(tmp_path / "retain.json")
    # The first 8 authors (20 questions each), then the 2 forget01 authors.
    expected = [r.prompt for r in full[:160]] + [r.prompt for r in full[-40:]]
    assert [r.prompt for r in finetune] == expected
    assert [r.prompt for r in retain] == expected[:160]
    forget = read_prompt_response(TOFU_DIR / "forget01.json")
    assert [r.prompt for r in finetune[160:]] == [r.prompt for r in forget]
    evaluation = read_tofu_questions(tmp_path / "retain_perturbed.json")
    assert [q.question for q in evaluation] == expected[:160]
