"""Tests for annotation: aggregation, rankings, the rubric score parser and the command."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from datamodules.annotation import (
    DEFAULT_RUBRICS,
    VisionLanguageAnnotator,
    aggregate,
    annotate_candidates,
    check_annotator_inputs,
    iter_candidates,
    parse_score,
    rank_from_scores,
)
from datamodules.image_preference import read_preference_records
from datamodules.jsonl import DataValidationError

NAN = math.nan


class BrightnessAnnotator:
    """Scores an image by its mean intensity times ``scale``.

    The score is NaN for images whose mean intensity is above ``nan_above``.
    """

    def __init__(self, aspect: str = "brightness", nan_above: float = 2.0, scale: float = 1.0):
        self.aspects = (aspect,)
        self.nan_above = nan_above
        self.scale = scale

    def annotate(self, prompts: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        brightness = images.mean(dim=(1, 2, 3))
        scores = brightness * self.scale
        scores[brightness > self.nan_above] = NAN
        return {self.aspects[0]: scores}


def assert_close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float64), equal_nan=True, rtol=0, atol=1e-6
    )


def test_aggregate_two_annotators_with_nan():
    first = {"aesthetic": torch.tensor([0.2, NAN, 0.6]), "fidelity": torch.tensor([1.0, 0.0, 0.5])}
    second = {
        "aesthetic": torch.tensor([0.4, 0.8, NAN]),
        "prompt_following": torch.tensor([0.3, 0.3, 0.9]),
    }

    result = aggregate([first, second])

    assert list(result) == ["aesthetic", "fidelity", "prompt_following"]
    # Image 0: (0.2 + 0.4) / 2. Images 1 and 2 keep the one score that is not NaN.
    assert_close(result["aesthetic"], [0.3, 0.8, 0.6])
    assert_close(result["fidelity"], [1.0, 0.0, 0.5])
    assert_close(result["prompt_following"], [0.3, 0.3, 0.9])


def test_aggregate_all_nan_stays_nan():
    result = aggregate(
        [{"fidelity": torch.tensor([NAN, 0.4])}, {"fidelity": torch.tensor([NAN, 0.8])}]
    )
    assert_close(result["fidelity"], [NAN, 0.6])


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError, match="empty list"):
        aggregate([])
    with pytest.raises(ValueError, match="returned \\[2, 3\\] scores"):
        aggregate([{"fidelity": torch.zeros(2)}, {"fidelity": torch.zeros(3)}])
    with pytest.raises(ValueError, match="expected \\[N\\]"):
        aggregate([{"fidelity": torch.zeros(2, 2)}])


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([0.9, 0.5, 0.5, 0.1], [1, 2, 2, 4]),
        ([0.1, 0.5, 0.9, 0.5], [4, 2, 1, 2]),
        ([3.0, 3.0, 3.0], [1, 1, 1]),
        ([0.2, 0.7], [2, 1]),
        ([-1.0, 0.0, -1.0, 5.0, 5.0], [4, 3, 4, 1, 1]),
    ],
)
def test_rank_from_scores_with_ties(scores, expected):
    assert rank_from_scores(scores) == expected
    assert rank_from_scores(torch.tensor(scores)) == expected


def test_rank_from_scores_rejects_nan():
    with pytest.raises(ValueError, match="positions \\[1\\]"):
        rank_from_scores([0.5, NAN, 0.2])


@pytest.mark.parametrize(
    ("output", "score"),
    [
        ("Score: 7", 7),
        ("Score: 10", 10),
        ("Score: 1", 1),
        ("**Score:** 8", 8),
        ("score = 4", 4),
        ("The strokes are clean and centered.\nScore: 9", 9),
        ("I would give it a score of 6.", 6),
        ("Score (1-10): 3", 3),
        ("Score: 7.5", 7.5),
        ("Score: 7/10", 7),
        ("At first Score: 2, but on reflection, Score: 5", 5),
        ("I'd rate this image 8/10.", 8),
        ("It deserves 4 out of 10", 4),
        ("6", 6),
        ("  6. ", 6),
        # A dash followed by a space is a separator, not a minus sign.
        ("Score: - 7", 7),
        ("Score - 7", 7),
    ],
)
def test_parse_score_maps_to_unit_interval(output, score):
    assert parse_score(output) == pytest.approx((score - 1) / 9)


@pytest.mark.parametrize(
    "output",
    ["", "The image looks fine.", "Score: 0", "Score: 11", "Score: N", "I count 3 cats", "12/10"],
)
def test_parse_score_unparseable_is_nan(output):
    assert math.isnan(parse_score(output))


@pytest.mark.parametrize(
    "output",
    [
        "Score: -3",
        "Score:-3",
        "**Score:** -5",
        "score of -2",
        "Score: -7.5",
        "-3/10",
        "I rate it -3 out of 10",
        "-3",
        # A hyphen between two numbers reads as the sign of the second one.
        "7-8/10",
    ],
)
def test_parse_score_negative_is_nan(output):
    assert math.isnan(parse_score(output))


def test_default_rubric_text():
    annotator = VisionLanguageAnnotator("unused-model")

    text = annotator.rubric_text("prompt_following", "a red cube on a blue sphere")

    assert text == (
        'An image was generated from the text prompt "a red cube on a blue sphere".\n'
        "Judge prompt following: does the image show everything the prompt asks for "
        "(objects, their number, attributes, positions and relations), and nothing that "
        "contradicts it?\n"
        "Rate the image on a scale from 1 (worst) to 10 (best). Answer with one line of the "
        'form "Score: N", where N is an integer from 1 to 10.'
    )
    assert annotator.aspects == ("prompt_following", "aesthetic", "fidelity", "harmlessness")
    for aspect in annotator.aspects:
        assert annotator.rubric_text(aspect, "PROMPT").count("PROMPT") == 1


def test_custom_rubric_keeps_other_braces():
    rubric = 'Does this match {prompt}? Reply as JSON {"reason": ..., "score": N}. Score: N'
    annotator = VisionLanguageAnnotator(
        "unused-model", aspects=("style", "aesthetic"), rubrics={"style": rubric}
    )

    assert annotator.rubric_text("style", "a cat") == (
        'Does this match a cat? Reply as JSON {"reason": ..., "score": N}. Score: N'
    )
    assert annotator.rubrics["aesthetic"] == DEFAULT_RUBRICS["aesthetic"]


def test_invalid_settings_listed_together():
    with pytest.raises(ValueError) as raised:
        VisionLanguageAnnotator(
            "unused-model",
            aspects=("style", "aesthetic"),
            rubrics={"aesthetic": "no placeholder"},
            batch_size=0,
        )
    message = str(raised.value)
    assert "aspect 'style' has no rubric" in message
    assert "rubric of aspect 'aesthetic' lacks the placeholder {prompt}" in message
    assert "batch_size=0" in message


def test_annotate_with_stubbed_generate(caplog):
    annotator = VisionLanguageAnnotator("stub", aspects=("aesthetic", "fidelity"), batch_size=2)
    calls = []
    answers = {
        "aesthetic": iter(["Score: 10", "Score: 1", "I cannot judge this."]),
        "fidelity": iter(["Score: 4", "7/10", "Score: 4"]),
    }

    def fake_generate(texts: list[str], images: torch.Tensor) -> list[str]:
        calls.append((list(texts), images.shape))
        aspect = "aesthetic" if "Judge aesthetics" in texts[0] else "fidelity"
        return [next(answers[aspect]) for _ in texts]

    annotator._generate = fake_generate
    images = torch.rand(3, 3, 8, 8)
    prompts = ["a cat", "a dog", "a bird"]

    with caplog.at_level(logging.WARNING, logger="datamodules.annotation"):
        scores = annotator.annotate(prompts, images)

    # Each aspect sends images 0-1, then image 2, because batch_size is 2.
    assert [shape[0] for _, shape in calls] == [2, 1, 2, 1]
    assert calls[0][0][1] == annotator.rubric_text("aesthetic", "a dog")
    assert calls[3][0][0] == annotator.rubric_text("fidelity", "a bird")
    torch.testing.assert_close(scores["aesthetic"], torch.tensor([1.0, 0.0, NAN]), equal_nan=True)
    torch.testing.assert_close(scores["fidelity"], torch.tensor([3 / 9, 6 / 9, 3 / 9]))
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "image 2, aspect 'aesthetic'" in warnings[0]
    assert "I cannot judge this." in warnings[0]


def test_stubbed_annotators_aggregate_skipping_nan():
    first = VisionLanguageAnnotator("first", aspects=("aesthetic",))
    second = VisionLanguageAnnotator("second", aspects=("aesthetic",))
    first._generate = lambda texts, images: ["Score: 10", "no score here"]
    second._generate = lambda texts, images: ["Score: 1", "Score: 4"]
    images = torch.rand(2, 3, 4, 4)

    result = aggregate([annotator.annotate(["p", "q"], images) for annotator in (first, second)])

    assert_close(result["aesthetic"], [0.5, 3 / 9])


def test_annotate_rejects_wrong_inputs():
    annotator = VisionLanguageAnnotator("stub", aspects=("aesthetic",))
    annotator._generate = lambda texts, images: ["Score: 5"] * len(texts)
    with pytest.raises(ValueError, match="expected \\[N, 3, H, W\\]"):
        annotator.annotate(["a"], torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="got 2 prompts for 1 images"):
        annotator.annotate(["a", "b"], torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="expected \\[0, 1\\]"):
        annotator.annotate(["a"], torch.full((1, 3, 4, 4), 255.0))
    with_nan = torch.rand(2, 3, 4, 4)
    with_nan[1, 0, 2, 3] = NAN
    with pytest.raises(ValueError, match="images \\[1\\] contain NaN"):
        annotator.annotate(["a", "b"], with_nan)


def test_check_annotator_inputs_rejects_nan():
    images = torch.rand(3, 3, 4, 4)
    images[0, 1, 0, 0] = NAN
    images[2, 2, 3, 3] = NAN

    with pytest.raises(ValueError, match="images \\[0, 2\\] contain NaN pixel values"):
        check_annotator_inputs(["a", "b", "c"], images)
    check_annotator_inputs(["a", "b", "c"], torch.nan_to_num(images, nan=0.5))


def write_candidates(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def save_gray_png(path: Path, value: int, size: int = 4) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)


def test_annotate_candidates_writes_rankings(tmp_path):
    save_gray_png(tmp_path / "in" / "images" / "dark.png", 51)
    candidates = write_candidates(
        tmp_path / "in" / "candidates.jsonl",
        [
            {
                "id": "first",
                "prompt": "something bright",
                # Brightness 0.2 (file), 0.5 (2x2 list), 0.75 (3x3 RGB list), 0.5 (2x2 list).
                "images": [
                    "images/dark.png",
                    [[0.5, 0.5], [0.5, 0.5]],
                    [[[0.75] * 3] * 3] * 3,
                    [[0.0, 1.0], [1.0, 0.0]],
                ],
            }
        ],
    )
    output = tmp_path / "out" / "annotated.jsonl"

    count = annotate_candidates(candidates, output, [BrightnessAnnotator()], label="rankings")

    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert count == 1
    assert records[0]["id"] == "first"
    assert records[0]["rankings"] == {"brightness": [4, 2, 1, 2]}
    assert "scores" not in records[0]
    # The path is rewritten relative to the output directory; pixel lists are kept.
    assert records[0]["images"][0] == "../in/images/dark.png"
    assert (output.parent / records[0]["images"][0]).is_file()
    assert records[0]["images"][1] == [[0.5, 0.5], [0.5, 0.5]]


def test_annotate_candidates_averages_and_drops_nan_aspect(tmp_path, caplog):
    candidates = write_candidates(
        tmp_path / "candidates.jsonl",
        [
            {"prompt": "p", "images": [[[0.2]], [[0.6]]]},
            {"prompt": "q", "images": [[[0.9]], [[0.1]]]},
        ],
    )
    output = tmp_path / "annotated.jsonl"
    annotators = [
        BrightnessAnnotator("brightness"),
        # Half the first annotator's score, so that a mean differs from either score.
        BrightnessAnnotator("brightness", nan_above=0.5, scale=0.5),
        BrightnessAnnotator("bright_only", nan_above=0.5),
    ]

    with caplog.at_level(logging.WARNING, logger="datamodules.annotation"):
        annotate_candidates(candidates, output, annotators)

    records = [json.loads(line) for line in output.read_text().splitlines()]
    # Image 0 of "p": mean of 0.2 and 0.1. Images brighter than nan_above (0.6 here and
    # 0.9 in "q") keep the first annotator's score alone.
    assert records[0]["scores"]["brightness"] == pytest.approx([0.15, 0.6])
    assert "bright_only" not in records[0]["scores"]
    # Image 1 of "q": mean of 0.1 and 0.05.
    assert records[1]["scores"] == {"brightness": pytest.approx([0.9, 0.075])}
    assert any(
        "'bright_only' left out because images [1]" in r.getMessage() for r in caplog.records
    )


def test_iter_candidates_errors(tmp_path):
    too_few = write_candidates(tmp_path / "few.jsonl", [{"prompt": "p", "images": [[[0.5]]]}])
    with pytest.raises(DataValidationError, match="needs at least 2"):
        list(iter_candidates(too_few))

    missing = write_candidates(
        tmp_path / "missing.jsonl", [{"prompt": "p", "images": ["a.png", "b.png"]}]
    )
    with pytest.raises(DataValidationError, match="images\\[0\\]"):
        list(iter_candidates(missing))

    out_of_range = write_candidates(
        tmp_path / "range.jsonl", [{"prompt": "p", "images": [[[2.0]], [[0.1]]]}]
    )
    with pytest.raises(DataValidationError, match="2.0 at index \\[0, 0\\] is outside \\[0, 1\\]"):
        list(iter_candidates(out_of_range))

    no_prompt = write_candidates(tmp_path / "prompt.jsonl", [{"images": [[[0.5]], [[0.1]]]}])
    with pytest.raises(DataValidationError, match="'prompt'"):
        list(iter_candidates(no_prompt))


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    """Save a randomly initialized 1-layer LLaVA with a 23-word tokenizer; no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "User:", "Assistant:", "Score:"]
    words += [str(number) for number in range(11)] + ["a", "the", "image", "prompt"]
    vocabulary = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    chat_template = (
        "{% for message in messages %}User: {% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}<image> {% else %}{{ item['text'] }}{% endif %}"
        "{% endfor %} {% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        chat_template=chat_template,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(words),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        image_token_index=vocabulary["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llava")
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_generate_with_tiny_random_llava(tiny_llava):
    annotator = VisionLanguageAnnotator(str(tiny_llava), aspects=("aesthetic",), max_new_tokens=4)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["a the image prompt a the image prompt", "Score:"]

    batched = annotator._generate(texts, images)
    alone = annotator._generate(texts[1:], images[1:])

    assert len(batched) == 2
    assert all(isinstance(text, str) and text for text in batched)
    # Left padding of the shorter question does not change its greedy answer.
    assert alone == batched[1:]
    assert annotator.annotate(["a", "b"], images)["aesthetic"].shape == (2,)


def test_iter_candidates_rejects_nan_pixels(tmp_path):
    # Python's json module writes and reads NaN, although standard JSON has no such token.
    with_nan = write_candidates(
        tmp_path / "nan.jsonl", [{"prompt": "p", "images": [[[0.5]], [[0.1, NAN]]]}]
    )

    with pytest.raises(DataValidationError) as raised:
        list(iter_candidates(with_nan))

    assert raised.value.field == "images[1]"
    assert "nan at index [0, 1] is outside [0, 1]" in str(raised.value)


def test_iter_candidates_range_in_float64(tmp_path):
    # 1 + 1e-9 rounds to 1.0 in float32, but image_preference.py rejects it.
    slightly_above = write_candidates(
        tmp_path / "above.jsonl", [{"prompt": "p", "images": [[[0.5]], [[1 + 1e-9]]]}]
    )

    with pytest.raises(DataValidationError, match="outside \\[0, 1\\]"):
        list(iter_candidates(slightly_above))


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_iter_candidates_rejects_empty_prompt(tmp_path, prompt):
    candidates = write_candidates(
        tmp_path / "prompt.jsonl", [{"prompt": prompt, "images": [[[0.5]], [[0.1]]]}]
    )

    with pytest.raises(DataValidationError) as raised:
        list(iter_candidates(candidates))

    assert raised.value.field == "prompt"
    assert "the prompt is empty" in str(raised.value)


@pytest.mark.parametrize("record_id", [7, 1.5, True, ["a"], {"name": "a"}])
def test_iter_candidates_rejects_non_string_id(tmp_path, record_id):
    candidates = write_candidates(
        tmp_path / "id.jsonl", [{"id": record_id, "prompt": "p", "images": [[[0.5]], [[0.1]]]}]
    )

    with pytest.raises(DataValidationError) as raised:
        list(iter_candidates(candidates))

    assert raised.value.field == "id"
    assert raised.value.line == 1
    assert "expected a string" in str(raised.value)


def test_iter_candidates_rejects_empty_path(tmp_path):
    candidates = write_candidates(
        tmp_path / "path.jsonl", [{"prompt": "p", "images": [[[0.5]], " "]}]
    )

    with pytest.raises(DataValidationError) as raised:
        list(iter_candidates(candidates))

    assert raised.value.field == "images[1]"
    assert "the image path is empty" in str(raised.value)


def test_annotate_candidates_null_id_left_out(tmp_path):
    candidates = write_candidates(
        tmp_path / "candidates.jsonl",
        [
            {"id": None, "prompt": "p", "images": [[[0.2]], [[0.6]]]},
            {"id": "named", "prompt": "q", "images": [[[0.9]], [[0.1]]]},
        ],
    )
    output = tmp_path / "annotated.jsonl"

    annotate_candidates(candidates, output, [BrightnessAnnotator()])

    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert "id" not in records[0]
    assert records[1]["id"] == "named"


@pytest.mark.parametrize("label", ["scores", "rankings"])
def test_annotate_candidates_output_reads_back(tmp_path, label):
    save_gray_png(tmp_path / "in" / "images" / "dark.png", 51)
    candidates = write_candidates(
        tmp_path / "in" / "candidates.jsonl",
        [
            {"id": "first", "prompt": "p", "images": ["images/dark.png", [[0.5, 0.5]]]},
            {"prompt": "q", "images": [[[0.9]], [[[0.1, 0.2, 0.3]]]]},
        ],
    )
    output = tmp_path / "out" / "annotated.jsonl"

    annotate_candidates(candidates, output, [BrightnessAnnotator()], label=label)
    records = read_preference_records(output, ["brightness"], image_size=4)

    assert [record.id for record in records] == ["first", None]
    assert [record.prompt for record in records] == ["p", "q"]
    assert records[0].load_images().shape == (2, 3, 4, 4)
    if label == "scores":
        assert records[0].ratings["brightness"] == pytest.approx([0.2, 0.5])
    else:
        # Rankings are negated on reading, so that higher is better.
        assert records[0].ratings["brightness"] == [-2.0, -1.0]


class ConstantAnnotator:
    """An annotator that returns the same ``scores``, one value per image, for every batch."""

    def __init__(self, aspect: str, scores: list[float]):
        self.aspects = (aspect,)
        self.scores = scores

    def annotate(self, prompts: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.aspects[0]: torch.tensor(self.scores)}


def test_annotate_candidates_infinite_scores(tmp_path, caplog):
    candidates = write_candidates(
        tmp_path / "candidates.jsonl", [{"prompt": "p", "images": [[[0.2]], [[0.6]], [[0.4]]]}]
    )
    annotators = [
        ConstantAnnotator("log_likelihood", [-math.inf, -1.0, 0.0]),
        BrightnessAnnotator(),
    ]

    with caplog.at_level(logging.WARNING, logger="datamodules.annotation"):
        annotate_candidates(candidates, tmp_path / "scores.jsonl", annotators)
    annotate_candidates(candidates, tmp_path / "rankings.jsonl", annotators, label="rankings")

    scores = json.loads((tmp_path / "scores.jsonl").read_text())
    rankings = json.loads((tmp_path / "rankings.jsonl").read_text())
    assert scores["scores"] == {"brightness": pytest.approx([0.2, 0.6, 0.4])}
    assert any(
        "'log_likelihood' left out because images [0] have infinite scores" in r.getMessage()
        for r in caplog.records
    )
    assert rankings["rankings"] == {"log_likelihood": [3, 2, 1], "brightness": [3, 1, 2]}
