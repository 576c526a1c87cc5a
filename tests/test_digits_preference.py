"""Tests for the digits preference data, its three annotators and the annotation command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.digits_preference as digits_preference
from datamodules.annotation import main as annotation_main
from datamodules.digits_preference import (
    ASPECTS,
    CANDIDATES_PER_PROMPT,
    DIGIT_WORDS,
    PROMPT_TEMPLATES,
    DigitAestheticAnnotator,
    DigitFidelityAnnotator,
    DigitPromptFollowingAnnotator,
    build_candidate_groups,
    degrade,
    digit_from_prompt,
    ensure_digits_preference,
    load_digit_data,
    write_digits_preference,
)

SIZES = {"train_prompts": 12, "val_prompts": 4, "test_prompts": 4}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    return write_digits_preference(tmp_path_factory.mktemp("digits") / "data", seed=0, **SIZES)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def as_rgb(gray: torch.Tensor) -> torch.Tensor:
    """[N, 32, 32] to [N, 3, 32, 32]."""
    return gray[:, None].expand(-1, 3, -1, -1)


def png_bytes_of(image: torch.Tensor) -> bytes:
    """The 8-bit gray levels of a [32, 32] image in [0, 1]."""
    return (image * 255).round().to(torch.uint8).numpy().tobytes()


def test_split_parts_disjoint_and_complete():
    data = load_digit_data()
    parts = [
        data.classifier_indices,
        data.train_indices,
        data.val_indices,
        data.test_indices,
    ]
    sets = [set(part.tolist()) for part in parts]

    assert sum(len(part) for part in sets) == len(data.labels) == 1797
    assert set().union(*sets) == set(range(1797))
    for part in parts:
        assert set(data.labels[part].tolist()) == set(range(10))


def test_candidates_never_come_from_classifier_part():
    data = load_digit_data()
    classifier_part = set(data.classifier_indices.tolist())
    for split in ("train", "val", "test"):
        allowed = set(data.split_indices(split).tolist())
        sources = {
            source
            for group in build_candidate_groups(split, 30, seed=0)
            for source in group.sources
        }
        assert not sources & classifier_part
        assert sources <= allowed


def test_written_images_differ_from_classifier_part(written):
    data = load_digit_data()
    classifier_images = {png_bytes_of(data.images[index]) for index in data.classifier_indices}
    split_images = {
        split: {png_bytes_of(data.images[index]) for index in data.split_indices(split)}
        for split in ("train", "val", "test")
    }
    clean_found = 0
    for split, path in written.items():
        for record in read_records(path):
            for relative in record["images"]:
                pixels = np.asarray(Image.open(path.parent / relative))[:, :, 0]
                image_bytes = pixels.tobytes()
                assert image_bytes not in classifier_images
                clean_found += image_bytes in split_images[split]
    # Three of the eight candidates of every prompt are clean digits of its split.
    assert clean_found == 3 * sum(SIZES.values())


def test_fidelity_clean_is_max_and_decreases_with_noise():
    data = load_digit_data()
    annotator = DigitFidelityAnnotator()
    for source in data.val_indices[:5].tolist():
        clean = data.images[source]
        noisy = [
            degrade(clean, "noise", strength, torch.Generator().manual_seed(source))
            for strength in (0.05, 0.1, 0.2, 0.35)
        ]
        images = as_rgb(torch.stack([clean, *noisy]))

        fidelity = annotator.annotate(["the digit 1"] * len(images), images)["fidelity"]

        assert fidelity[0] == 1.0
        assert torch.all(fidelity[1:] < fidelity[:-1]), fidelity


def test_fidelity_lower_for_every_degradation():
    data = load_digit_data()
    clean = data.images[data.train_indices[0]]
    generator = torch.Generator().manual_seed(0)
    degraded = [
        degrade(clean, kind, strengths[0], generator)
        for kind, strengths in digits_preference.DEGRADATIONS.items()
    ]
    images = as_rgb(torch.stack([clean, *degraded]))

    fidelity = DigitFidelityAnnotator().annotate(["p"] * len(images), images)["fidelity"]

    assert torch.all(fidelity[1:] < 0.95), fidelity


def test_prompt_following_correct_high_wrong_low():
    data = load_digit_data()
    held_out = data.val_indices
    images = as_rgb(data.images[held_out])
    labels = data.labels[held_out].tolist()
    correct_prompts = [f"a handwritten digit {DIGIT_WORDS[label]}" for label in labels]
    wrong_prompts = [f"the digit {(label + 3) % 10}" for label in labels]
    annotator = DigitPromptFollowingAnnotator()

    correct = annotator.annotate(correct_prompts, images)["prompt_following"]
    wrong = annotator.annotate(wrong_prompts, images)["prompt_following"]

    assert correct.mean() > 0.8
    assert wrong.mean() < 0.05
    assert (correct > wrong).float().mean() > 0.95


def test_aesthetic_drops_with_degradation():
    data = load_digit_data()
    sources = data.val_indices[:20].tolist()
    annotator = DigitAestheticAnnotator()
    clean = data.images[sources]
    clean_score = annotator.annotate(["p"] * len(sources), as_rgb(clean))["aesthetic"]
    for kind in ("noise", "blur", "low_contrast"):
        strongest = digits_preference.DEGRADATIONS[kind][-1]
        generator = torch.Generator().manual_seed(0)
        degraded = torch.stack([degrade(image, kind, strongest, generator) for image in clean])

        degraded_score = annotator.annotate(["p"] * len(sources), as_rgb(degraded))["aesthetic"]

        assert torch.all(degraded_score < clean_score), kind


def test_aesthetic_black_image_is_zero():
    images = torch.zeros(1, 3, 32, 32)
    assert DigitAestheticAnnotator().annotate(["p"], images)["aesthetic"].item() == 0.0


@pytest.mark.parametrize("template", PROMPT_TEMPLATES)
def test_digit_from_prompt_reads_every_template(template):
    for digit, word in enumerate(DIGIT_WORDS):
        assert digit_from_prompt(template.format(word=word, numeral=digit)) == digit
        assert digit_from_prompt(template.format(word=word, numeral=digit).upper() + ".") == digit


@pytest.mark.parametrize(
    "prompt", ["a handwritten letter", "a two or a three", "the number 12", "the digit 0.5"]
)
def test_digit_from_prompt_rejects_ambiguous(prompt):
    with pytest.raises(ValueError, match="expected exactly one"):
        digit_from_prompt(prompt)


def test_written_files_follow_record_format(written):
    assert set(written) == {"train", "val", "test"}
    expected_counts = {"train": 12, "val": 4, "test": 4}
    for split, path in written.items():
        records = read_records(path)
        assert len(records) == expected_counts[split]
        assert len({record["id"] for record in records}) == len(records)
        for record in records:
            assert set(record) == {"id", "prompt", "images", "scores"}
            assert 0 <= digit_from_prompt(record["prompt"]) <= 9
            assert len(record["images"]) == CANDIDATES_PER_PROMPT
            for relative in record["images"]:
                assert not Path(relative).is_absolute()
                with Image.open(path.parent / relative) as image:
                    assert image.mode == "RGB"
                    assert image.size == (32, 32)
            assert tuple(record["scores"]) == ASPECTS
            for values in record["scores"].values():
                assert len(values) == CANDIDATES_PER_PROMPT
                assert all(isinstance(value, float) and 0 <= value <= 1 for value in values)
            # Every prompt has clean digits (fidelity 1) and degraded ones.
            assert max(record["scores"]["fidelity"]) == 1.0
            assert min(record["scores"]["fidelity"]) < 1.0


def test_same_seed_same_files(written, tmp_path):
    again = write_digits_preference(tmp_path / "again", seed=0, **SIZES)
    other = write_digits_preference(tmp_path / "other", seed=1, **SIZES)

    for split in ("train", "val", "test"):
        assert again[split].read_bytes() == written[split].read_bytes()
        assert other[split].read_bytes() != written[split].read_bytes()
    first_image = "images/train_0000_0.png"
    assert (tmp_path / "again" / first_image).read_bytes() == (
        written["train"].parent / first_image
    ).read_bytes()


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    saved = []

    def failing_save(image, path):
        if len(saved) == 5:
            raise RuntimeError("simulated interruption")
        saved.append(path)

    monkeypatch.setattr(digits_preference, "_save_png", failing_save)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        write_digits_preference(tmp_path / "data", **SIZES)

    assert list(tmp_path.iterdir()) == []


def test_ensure_builds_once(monkeypatch, tmp_path):
    monkeypatch.setenv("PAPERLAB_CACHE", str(tmp_path / "cache"))
    builds = []
    original = digits_preference.write_digits_preference

    def small_build(directory, seed=0):
        builds.append(seed)
        return original(directory, seed=seed, **SIZES)

    monkeypatch.setattr(digits_preference, "write_digits_preference", small_build)
    first = ensure_digits_preference(seed=0)
    second = ensure_digits_preference(seed=0)

    assert builds == [0]
    assert first == second
    assert first["train"] == tmp_path / "cache" / "digits_preference" / "v2-seed-0" / "train.jsonl"
    assert all(path.is_file() for path in first.values())


def test_command_end_to_end_with_digit_annotators(tmp_path):
    data = load_digit_data()
    three = data.test_indices[data.labels[data.test_indices] == 3][0].item()
    five = data.test_indices[data.labels[data.test_indices] == 5][0].item()
    noisy_three = degrade(data.images[three], "noise", 0.2, torch.Generator().manual_seed(0))
    images_directory = tmp_path / "candidates" / "images"
    images_directory.mkdir(parents=True)
    for name, image in (("three.png", data.images[three]), ("five.png", data.images[five])):
        digits_preference._save_png(image, images_directory / name)
    candidates = tmp_path / "candidates" / "candidates.jsonl"
    candidates.write_text(
        json.dumps(
            {
                "id": "c0",
                "prompt": "the number 3 written by hand",
                "images": ["images/three.png", "images/five.png", noisy_three.tolist()],
            }
        )
        + "\n",
        encoding="utf-8",
    )
    annotators = json.dumps(
        [
            {"class_path": "datamodules.digits_preference.DigitPromptFollowingAnnotator"},
            {"class_path": "datamodules.digits_preference.DigitFidelityAnnotator"},
            {"class_path": "datamodules.digits_preference.DigitAestheticAnnotator"},
        ]
    )
    scores_file = tmp_path / "scores.jsonl"
    rankings_file = tmp_path / "rankings.jsonl"

    for output, label in ((scores_file, "scores"), (rankings_file, "rankings")):
        arguments = ["--candidates", str(candidates), "--output", str(output)]
        annotation_main([*arguments, "--annotators", annotators, "--label", label])

    [scored] = read_records(scores_file)
    assert scored["id"] == "c0"
    assert scored["images"][:2] == ["candidates/images/three.png", "candidates/images/five.png"]
    assert list(scored["scores"]) == ["prompt_following", "fidelity", "aesthetic"]
    prompt_following = scored["scores"]["prompt_following"]
    assert prompt_following[0] > 0.5 > prompt_following[1]
    assert scored["scores"]["fidelity"][:2] == [1.0, 1.0]
    assert scored["scores"]["fidelity"][2] < 1.0
    [ranked] = read_records(rankings_file)
    assert ranked["rankings"]["fidelity"] == [1, 1, 3]
    assert ranked["rankings"]["prompt_following"][0] == 1
