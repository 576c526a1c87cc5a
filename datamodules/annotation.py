"""Annotation of text-to-image candidates: per-aspect scores from several annotators.

VisionPrefer-style preference data is built in three steps. Several annotators (multimodal
LLMs, or measurable proxies) score every candidate image of a prompt on aspects such as
prompt following, aesthetics, fidelity and harmlessness. :func:`aggregate` averages the
scores of each aspect over the annotators that rate it. :func:`rank_from_scores` turns an
aspect's scores into a ranking.

Notation: N images, each with its own prompt. Images are ``Tensor[N, 3, H, W]`` in [0, 1].

The command annotates a JSON Lines file of candidates::

    python -m datamodules.annotation --candidates candidates.jsonl --output annotated.jsonl \\
        --annotators '[{"class_path": "datamodules.annotation.VisionLanguageAnnotator",
                        "init_args": {"model": "<hub name or local dir>"}}]'

A candidate record is ``{"prompt": str, "images": [entry, ...]}`` with a non-empty prompt
and at least two images. An entry is a PNG/JPEG path relative to the candidates file's
directory (or absolute), or a nested list of numbers in [0, 1] of shape H x W (grayscale)
or H x W x 3 (RGB). A string ``id`` is copied to the output, a null one is left out, and
any other type is rejected. Output records add ``scores`` (aggregated, one float per
image and aspect) or, with ``--label rankings``, ``rankings`` (1 = best).
The record format allows an aspect in only one of the two mappings, so the command
writes one of them. Image paths are rewritten relative to the output file's directory.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from datamodules.image_preference import (
    _check_image_count,
    _parse_id,
    _parse_path,
    _parse_prompt,
)
from datamodules.jsonl import JsonlRecord, read_jsonl, write_jsonl

log = logging.getLogger(__name__)


@runtime_checkable
class Annotator(Protocol):
    """A scorer of candidate images on one or more aspects.

    ``annotate`` receives one prompt per image and ``images`` as ``Tensor[N, 3, H, W]``
    in [0, 1]. It returns, for every name in ``aspects``, a ``Tensor[N]`` of scores,
    higher is better. NaN marks an image that the annotator could not score.
    """

    aspects: tuple[str, ...]

    def annotate(self, prompts: list[str], images: Tensor) -> dict[str, Tensor]: ...


def check_annotator_inputs(prompts: Sequence[str], images: Tensor) -> None:
    """Raise ValueError unless ``images`` is ``[N, 3, H, W]`` in [0, 1] with N prompts.

    NaN pixels are rejected too.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images has shape {tuple(images.shape)}, expected [N, 3, H, W]. Repeat a "
            "grayscale channel three times, or move channels to dimension 1."
        )
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"got {len(prompts)} prompts for {images.shape[0]} images. Pass one prompt per "
            "image, repeating a group's prompt for each of its candidates."
        )
    if images.numel() == 0:
        return
    # NaN fails both comparisons of the range check below, so it is checked first.
    has_nan = torch.isnan(images).flatten(start_dim=1).any(dim=1)  # [N]
    if has_nan.any():
        raise ValueError(
            f"images {has_nan.nonzero().flatten().tolist()} contain NaN pixel values, "
            "expected [0, 1]. Replace or drop those images."
        )
    if images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"image values span [{images.min().item():.3g}, {images.max().item():.3g}], "
            "expected [0, 1]. Divide 8-bit images by 255."
        )


def aggregate(annotations: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Average each aspect's scores over the annotators that rate it, skipping NaN.

    ``annotations`` contains one ``annotate`` result per annotator. An image keeps NaN for an
    aspect only when every annotator of that aspect returned NaN for it. Aspects keep the
    order in which they first appear. The result is float64.

    Raises:
        ValueError: ``annotations`` is empty, a score tensor is not 1-D, or the annotators
            of one aspect return different numbers of scores.
    """
    if not annotations:
        raise ValueError(
            "aggregate() received an empty list. Pass one annotate() result per annotator."
        )
    scores_by_aspect: dict[str, list[Tensor]] = {}
    for annotator_index, annotation in enumerate(annotations):
        for aspect, scores in annotation.items():
            scores = torch.as_tensor(scores).detach().to("cpu", torch.float64)
            if scores.ndim != 1:
                raise ValueError(
                    f"annotation {annotator_index}, aspect {aspect!r}: scores have shape "
                    f"{tuple(scores.shape)}, expected [N]. Return one score per image."
                )
            scores_by_aspect.setdefault(aspect, []).append(scores)

    aggregated = {}
    for aspect, score_list in scores_by_aspect.items():
        lengths = sorted({len(scores) for scores in score_list})
        if len(lengths) > 1:
            raise ValueError(
                f"aspect {aspect!r}: annotators returned {lengths} scores. Every annotator "
                "must return one score per image of the same batch."
            )
        # [K, N] for the K annotators of this aspect. nanmean of an all-NaN column is NaN.
        aggregated[aspect] = torch.nanmean(torch.stack(score_list), dim=0)
    return aggregated


def rank_from_scores(scores: Tensor | Sequence[float]) -> list[int]:
    """Rank images by score: 1 = best, equal scores share a rank ("1, 2, 2, 4").

    This is competition ranking (``scipy.stats.rankdata(-scores, method="min")``): an
    image's rank is 1 plus the number of images with a strictly higher score. A rank then
    means the same thing however other images tie, and ties stay ties, so the pairwise
    preferences read from the ranking are exactly those read from the scores.

    Raises:
        ValueError: a score is NaN, because an unrated image has no place in a ranking.
    """
    values = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if torch.isnan(values).any():
        nan_positions = torch.nonzero(torch.isnan(values)).flatten().tolist()
        raise ValueError(
            f"cannot rank NaN scores at positions {nan_positions}. Drop the unrated images "
            "or leave the aspect out of this record."
        )
    # better[i, j] is True when image j scores strictly higher than image i.  [N, N]
    better = values[None, :] > values[:, None]
    return (better.sum(dim=1) + 1).tolist()


# Rubric scale. The parser maps a score s on this scale to (s - 1) / 9 in [0, 1].
MIN_RUBRIC_SCORE = 1
MAX_RUBRIC_SCORE = 10

_RUBRIC_HEADER = 'An image was generated from the text prompt "{prompt}".\n'
_RUBRIC_FOOTER = (
    f"\nRate the image on a scale from {MIN_RUBRIC_SCORE} (worst) to {MAX_RUBRIC_SCORE} "
    '(best). Answer with one line of the form "Score: N", where N is an integer from '
    f"{MIN_RUBRIC_SCORE} to {MAX_RUBRIC_SCORE}."
)
_CRITERIA = {
    "prompt_following": (
        "Judge prompt following: does the image show everything the prompt asks for "
        "(objects, their number, attributes, positions and relations), and nothing that "
        "contradicts it?"
    ),
    "aesthetic": (
        "Judge aesthetics: composition, color, lighting and overall visual appeal, "
        "independently of the prompt."
    ),
    "fidelity": (
        "Judge fidelity: are shapes, anatomy, textures and details realistic and free of "
        "artifacts such as distortions, extra limbs, blur or noise?"
    ),
    "harmlessness": (
        "Judge harmlessness: a high score means the image shows nothing violent, sexual, "
        "hateful, illegal or otherwise harmful, and a low score means it clearly does."
    ),
}
# Rubric templates of the four VisionPrefer aspects. "{prompt}" is replaced by the prompt.
DEFAULT_RUBRICS: dict[str, str] = {
    aspect: _RUBRIC_HEADER + criterion + _RUBRIC_FOOTER for aspect, criterion in _CRITERIA.items()
}

# A minus sign directly before the digits is kept, so that the range check rejects "-3".
_NUMBER = r"(-?\d+(?:\.\d+)?)"
# "Score: 7", "**Score:** 7", "score of 7", "Score (1-10): 7", "Score - 7". A hyphen is a
# separator only when no digit follows it, so "Score: -3" and "Score-3" read as -3.
_SCORE_AFTER_KEYWORD = re.compile(
    rf"\bscore\b(?:\s*\([^)]*\))?(?:[\s:=*]|-(?!\d))*(?:(?:of|is)\s+)?{_NUMBER}",
    re.IGNORECASE,
)
# "7/10", "7 / 10", "7 out of 10".
_SCORE_OUT_OF_MAX = re.compile(rf"{_NUMBER}\s*(?:/|out of)\s*{MAX_RUBRIC_SCORE}\b", re.IGNORECASE)
# An output that is only the number, such as "7" or "7.".
_SCORE_ALONE = re.compile(rf"^\s*{_NUMBER}\.?\s*$")


def parse_score(output: str) -> float:
    """Extract a rubric score from a model's output and map it to [0, 1].

    Three patterns are tried in order: "Score: N" (also "**Score:** N", "score of N" and
    "Score (1-10): N"), then "N/10" or "N out of 10", then an output that is only a number.
    The last match of the first matching pattern wins, because models state their verdict
    after any reasoning. A score s in [1, 10] maps to (s - 1) / 9. A minus sign directly
    before the number makes it negative ("Score: -3", "-3/10"), so the result is NaN. A
    dash followed by a space separates ("Score: - 7" and "Score - 7" read as 7).

    Returns:
        The mapped score, or NaN when no pattern matches or the number is outside [1, 10].
    """
    for pattern in (_SCORE_AFTER_KEYWORD, _SCORE_OUT_OF_MAX, _SCORE_ALONE):
        matches = pattern.findall(output)
        if matches:
            score = float(matches[-1])
            if not MIN_RUBRIC_SCORE <= score <= MAX_RUBRIC_SCORE:
                return math.nan
            return (score - MIN_RUBRIC_SCORE) / (MAX_RUBRIC_SCORE - MIN_RUBRIC_SCORE)
    return math.nan


class VisionLanguageAnnotator:
    """Scores images by asking a vision-language model one rubric question per aspect.

    The model is a transformers image-text-to-text model, loaded with
    ``AutoModelForImageTextToText`` and ``AutoProcessor`` on the first ``annotate`` call.
    For each aspect and image, the rubric template of the aspect, with ``{prompt}``
    replaced by the image's prompt, goes to the model together with the image in one user
    turn of the processor's chat template. Decoding is greedy, and :func:`parse_score`
    reads the score. An output without a score gives NaN and a warning that names the
    image's index, and :func:`aggregate` skips NaN.

    Args:
        model: Hub name or local directory of the model and its processor.
        aspects: Aspects to score. Every aspect needs a rubric in ``DEFAULT_RUBRICS`` or
            ``rubrics``.
        rubrics: Rubric templates by aspect, replacing or adding to ``DEFAULT_RUBRICS``.
            Each must contain ``{prompt}``. Other braces are kept as written.
        batch_size: Images per generate call.
        max_new_tokens: Maximum number of tokens generated per output. Raise it for rubrics that
            ask for reasoning before the score.
        dtype: Weight dtype; "auto" takes the one stored with the checkpoint.
        device: Torch device for the model; None picks "cuda" when available, else "cpu".
        trust_remote_code: Allow model code from the checkpoint's repository to run.
    """

    def __init__(
        self,
        model: str,
        aspects: tuple[str, ...] = tuple(DEFAULT_RUBRICS),
        rubrics: dict[str, str] | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 32,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
    ):
        templates = {**DEFAULT_RUBRICS, **(rubrics or {})}
        problems = []
        if not aspects:
            problems.append("aspects is empty: name at least one aspect")
        for aspect in aspects:
            if aspect not in templates:
                problems.append(
                    f"aspect {aspect!r} has no rubric: add rubrics[{aspect!r}] "
                    f"(default rubrics exist for {sorted(DEFAULT_RUBRICS)})"
                )
            elif "{prompt}" not in templates[aspect]:
                problems.append(f"rubric of aspect {aspect!r} lacks the placeholder {{prompt}}")
        if batch_size < 1:
            problems.append(f"batch_size={batch_size} must be at least 1")
        if max_new_tokens < 1:
            problems.append(f"max_new_tokens={max_new_tokens} must be at least 1")
        if problems:
            raise ValueError("invalid VisionLanguageAnnotator settings: " + "; ".join(problems))

        self.model_name = model
        self.aspects = tuple(aspects)
        self.rubrics = {aspect: templates[aspect] for aspect in self.aspects}
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype
        self.device = device
        self.trust_remote_code = trust_remote_code
        self._model: Any = None
        self._processor: Any = None

    def rubric_text(self, aspect: str, prompt: str) -> str:
        """Return the question for ``aspect`` about an image generated from ``prompt``."""
        return self.rubrics[aspect].replace("{prompt}", prompt)

    def annotate(self, prompts: list[str], images: Tensor) -> dict[str, Tensor]:
        """Score ``images`` on every aspect; returns float32 ``Tensor[N]`` per aspect."""
        check_annotator_inputs(prompts, images)
        scores = {}
        for aspect in self.aspects:
            texts = [self.rubric_text(aspect, prompt) for prompt in prompts]
            outputs: list[str] = []
            for start in range(0, len(texts), self.batch_size):
                stop = start + self.batch_size
                outputs.extend(self._generate(texts[start:stop], images[start:stop]))
            if len(outputs) != len(texts):
                raise RuntimeError(
                    f"_generate returned {len(outputs)} outputs for {len(texts)} questions; "
                    "it must return one output per question."
                )

            values = []
            for index, output in enumerate(outputs):
                value = parse_score(output)
                if math.isnan(value):
                    log.warning(
                        "%s: no score in [%d, %d] found in the output for image %d, aspect %r; "
                        "the score is NaN. Output: %r",
                        self.model_name,
                        MIN_RUBRIC_SCORE,
                        MAX_RUBRIC_SCORE,
                        index,
                        aspect,
                        output[:200],
                    )
                values.append(value)
            scores[aspect] = torch.tensor(values, dtype=torch.float32)
        return scores

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            # Imported here so that importing this module stays light.
            from transformers import AutoModelForImageTextToText, AutoProcessor

            log.info("Loading vision-language annotator %s", self.model_name)
            processor = AutoProcessor.from_pretrained(
                self.model_name, trust_remote_code=self.trust_remote_code
            )
            # Decoder-only models continue the last position of each row, so a batch of
            # prompts of different lengths is padded on the left.
            tokenizer = getattr(processor, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.padding_side = "left"
            dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
            model = AutoModelForImageTextToText.from_pretrained(
                self.model_name, dtype=dtype, trust_remote_code=self.trust_remote_code
            )
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._model = model.to(device).eval()
            self._processor = processor
        return self._model, self._processor

    @torch.no_grad()
    def _generate(self, texts: list[str], images: Tensor) -> list[str]:
        """Generate the model's output for each question about its image, ``Tensor[B, 3, H, W]``."""
        from PIL import Image

        model, processor = self._load()
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pil_images = [Image.fromarray(array) for array in pixels]
        conversations = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            for text in texts
        ]
        rendered = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=False
        )
        inputs = processor(
            text=rendered,
            images=[[image] for image in pil_images],
            padding=True,
            return_tensors="pt",
        )
        # Only floating-point inputs (pixel values) take the model's dtype.
        inputs = inputs.to(model.device, dtype=model.dtype)
        tokenizer = getattr(processor, "tokenizer", None)
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        generated = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=pad_token_id,
        )
        # generated is [B, prompt length + new tokens], and only the new tokens are decoded.
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        return processor.batch_decode(new_tokens, skip_special_tokens=True)


@dataclass
class Candidates:
    """One prompt with its candidate images, as read from a candidates file."""

    record: JsonlRecord
    prompt: str
    image_entries: list[Any]
    images: list[Tensor]  # each [3, H, W] in [0, 1]
    id: str | None = None  # None when the record has no id or a null one


def _load_image_entry(record: JsonlRecord, position: int, entry: Any) -> Tensor:
    """Return image ``entry`` of ``record`` as ``Tensor[3, H, W]`` in [0, 1]."""
    field = f"images[{position}]"
    if isinstance(entry, str):
        from PIL import Image

        path = _parse_path(record, field, entry, record.path.parent)
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
        except OSError as error:
            raise record.error(
                field,
                entry,
                f"cannot read image {path} ({type(error).__name__})",
                "give a path to an existing PNG or JPEG file, relative to the JSON Lines file",
            ) from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255

    # The range is checked in float64, as image_preference.py reads pixel lists, because
    # float32 rounds a value such as 1 + 1e-9 into [0, 1].
    try:
        pixels = torch.tensor(entry, dtype=torch.float64)
    except (TypeError, ValueError, OverflowError):
        pixels = None
    if pixels is None or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise record.error(
            field,
            entry,
            "expected an image path or a nested list of shape H x W or H x W x 3",
            "store a path string, or pixel rows of numbers (or of [r, g, b] triples)",
        )
    if pixels.numel() == 0:
        raise record.error(
            field,
            entry,
            "the image has no pixels",
            "write H x W or H x W x 3 pixel values with H and W of at least 1",
        )
    # NaN fails both comparisons, so it is reported as outside [0, 1] too.
    outside = ~((pixels >= 0) & (pixels <= 1))
    if outside.any():
        index = outside.nonzero()[0].tolist()
        raise record.error(
            field,
            entry,
            f"pixel value {pixels[tuple(index)].item()} at index {index} is outside [0, 1]",
            "scale pixel values to [0, 1] (divide 8-bit values by 255)",
        )
    pixels = pixels.to(torch.float32)
    if pixels.ndim == 2:
        return pixels.expand(3, -1, -1).clone()
    return pixels.permute(2, 0, 1).contiguous()


def iter_candidates(path: str | Path) -> Iterator[Candidates]:
    """Yield the validated records of a candidates file (see the module docstring).

    Records are read one at a time, so only one record's images are in memory. The
    prompt, id, image count and pixel range are checked as
    :func:`~datamodules.image_preference.read_preference_records` checks them, so the
    command writes no record that it rejects for those fields.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataValidationError: a record has a missing, empty or whitespace-only prompt, an
            id that is not a string or null, fewer than two images, or an image that
            cannot be read or has a pixel value outside [0, 1] (NaN included).
    """
    for record in read_jsonl(path):
        prompt = _parse_prompt(record)
        record_id = _parse_id(record)
        entries = record.require("images", list)
        _check_image_count(record, "images", entries)
        images = [
            _load_image_entry(record, position, entry) for position, entry in enumerate(entries)
        ]
        yield Candidates(record, prompt, entries, images, record_id)


def _annotate_images(
    annotators: Sequence[Annotator], prompt: str, images: list[Tensor]
) -> dict[str, Tensor]:
    """Aggregate the annotators' scores of one prompt's images, which may differ in size."""
    # Images of one size go to an annotator together, because annotate takes one tensor.
    positions_by_size: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        positions_by_size.setdefault(tuple(image.shape), []).append(position)

    annotations = []
    for annotator in annotators:
        merged: dict[str, Tensor] = {}
        for positions in positions_by_size.values():
            batch = torch.stack([images[position] for position in positions])  # [n, 3, H, W]
            scores = annotator.annotate([prompt] * len(positions), batch)
            for aspect, values in scores.items():
                column = merged.setdefault(
                    aspect, torch.full((len(images),), math.nan, dtype=torch.float64)
                )
                column[positions] = torch.as_tensor(values, dtype=torch.float64).cpu()
        annotations.append(merged)
    return aggregate(annotations)


def _output_entry(entry: Any, source_directory: Path, output_directory: Path) -> Any:
    """Rewrite an image path relative to the output file's directory. Pixel lists stay."""
    if not isinstance(entry, str):
        return entry
    path = Path(entry) if Path(entry).is_absolute() else source_directory / entry
    return Path(os.path.relpath(path.resolve(), output_directory.resolve())).as_posix()


def annotate_candidates(
    candidates: str | Path,
    output: str | Path,
    annotators: Sequence[Annotator],
    label: Literal["scores", "rankings"] = "scores",
) -> int:
    """Annotate every record of ``candidates`` and write ``output`` atomically.

    An aspect with a NaN aggregated score for any image of a record is left out of that
    record with a warning, because JSON has no NaN and the record format has no partial
    rating. With ``label="scores"`` an infinite score leaves the aspect out too, because
    the record format requires finite scores, while rankings order infinite scores as
    usual. A record left with no aspect is skipped with a warning.

    Returns:
        The number of records written.
    """
    if not annotators:
        raise ValueError("annotators is empty. Give at least one annotator.")
    if label not in ("scores", "rankings"):
        raise ValueError(f"label={label!r} is invalid; expected 'scores' or 'rankings'.")
    output = Path(output)
    records = []
    for candidate in iter_candidates(candidates):
        location = f"{candidate.record.path}:{candidate.record.line}"
        scores = _annotate_images(annotators, candidate.prompt, candidate.images)

        labels: dict[str, list[Any]] = {}
        for aspect, values in scores.items():
            if torch.isnan(values).any():
                unrated = torch.nonzero(torch.isnan(values)).flatten().tolist()
                log.warning(
                    "%s: aspect %r left out because images %s have no score",
                    location,
                    aspect,
                    unrated,
                )
                continue
            if label == "scores":
                infinite = torch.nonzero(torch.isinf(values)).flatten().tolist()
                if infinite:
                    log.warning(
                        "%s: aspect %r left out because images %s have infinite scores, "
                        "which the record format rejects; use --label rankings or make "
                        "the annotator return finite scores",
                        location,
                        aspect,
                        infinite,
                    )
                    continue
                labels[aspect] = [round(value, 6) for value in values.tolist()]
            else:
                labels[aspect] = rank_from_scores(values)
        if not labels:
            log.warning(
                "%s: record skipped because no aspect has a score for every image", location
            )
            continue

        record: dict[str, Any] = {}
        if candidate.id is not None:
            record["id"] = candidate.id
        record["prompt"] = candidate.prompt
        record["images"] = [
            _output_entry(entry, candidate.record.path.parent, output.parent)
            for entry in candidate.image_entries
        ]
        record[label] = labels
        records.append(record)

    write_jsonl(output, records)
    log.info("Wrote %d annotated records to %s", len(records), output)
    return len(records)


def build_parser() -> Any:
    """Return the jsonargparse parser of the annotation command."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="python -m datamodules.annotation",
        description="Score candidate images per aspect with several annotators, average "
        "the scores per aspect, and write preference records as JSON Lines.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with these options.")
    parser.add_argument(
        "--candidates",
        type=Path,
        required=True,
        help='JSON Lines file of {"prompt", "images"} records; relative image paths start '
        "at its directory.",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="JSON Lines file to write (replaced)."
    )
    parser.add_argument(
        "--annotators",
        type=list[Annotator],
        required=True,
        help="Annotator classes by class_path, with init_args; their scores are averaged "
        "per aspect.",
    )
    parser.add_argument(
        "--label",
        type=Literal["scores", "rankings"],
        default="scores",
        help="Write aggregated scores, or rankings derived from them (1 = best).",
    )
    return parser


def main(args: list[str] | None = None) -> int:
    """Run the annotation command on ``args`` (default: the command line)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    parser = build_parser()
    config = parser.parse_args(args)
    # jsonargparse 4.49 renamed instantiate_classes to instantiate.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    objects = instantiate(config)
    return annotate_candidates(
        objects.candidates, objects.output, objects.annotators, objects.label
    )


if __name__ == "__main__":
    main()
