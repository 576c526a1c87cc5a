"""Print a table of a TS-Align run's held-out answers, one row per iteration.

Reads every ``validation_<epoch>.jsonl`` that ``TSAlign`` wrote into the given
``ts_align/`` folders (a resumed run writes into a new run directory, so give both) and
prints per iteration: the win rate against the starting policy with wins, ties and
losses, the mean answer length in characters of the policy and of the starting policy,
and how many answers of each open with an apology or refusal (``REFUSAL_OPENINGS``,
compared case-insensitively). Run from the repository root:

    python scripts/ts_align_summary.py runs/paperlab/<run id>/ts_align [more folders]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

REFUSAL_OPENINGS = ("i'm sorry", "i am sorry", "i apologize", "i cannot", "i can't")


def is_refusal(answer: str) -> bool:
    """Return whether ``answer`` opens with one of ``REFUSAL_OPENINGS``."""
    return answer.strip().lower().startswith(REFUSAL_OPENINGS)


def summarize(records: list[dict]) -> dict[str, float]:
    """Return the row of one iteration's validation records."""
    credits = [record["win"] for record in records]
    return {
        "prompts": len(records),
        "win_rate": statistics.mean(credits),
        "wins": credits.count(1.0),
        "ties": credits.count(0.5),
        "losses": credits.count(0.0),
        "length": statistics.mean(len(record["answer"]) for record in records),
        "base_length": statistics.mean(len(record["base_answer"]) for record in records),
        "refusals": sum(is_refusal(record["answer"]) for record in records),
        "base_refusals": sum(is_refusal(record["base_answer"]) for record in records),
    }


def read_iterations(folders: list[Path]) -> dict[int, list[dict]]:
    """Return the validation records of every iteration found in ``folders``, by epoch."""
    iterations = {}
    for folder in folders:
        for path in folder.glob("validation_*.jsonl"):
            epoch = int(re.fullmatch(r"validation_(\d+)\.jsonl", path.name).group(1))
            lines = path.read_text(encoding="utf-8").splitlines()
            iterations[epoch] = [json.loads(line) for line in lines if line.strip()]
    return dict(sorted(iterations.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="ts_align/ folders of the run")
    folders = parser.parse_args().folders
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        sys.exit(f"not found: {', '.join(missing)}; give the ts_align/ folders of a run")
    iterations = read_iterations(folders)
    if not iterations:
        sys.exit(f"no validation_<epoch>.jsonl in {', '.join(map(str, folders))}")

    print(
        "| epoch | prompts | win rate (W/T/L) | mean length, policy / start | refusals, policy / start |"
    )
    print("|---|---|---|---|---|")
    for epoch, records in iterations.items():
        row = summarize(records)
        print(
            f"| {epoch} | {row['prompts']} | {row['win_rate']:.4f} "
            f"({row['wins']}/{row['ties']}/{row['losses']}) | "
            f"{row['length']:.0f} / {row['base_length']:.0f} | "
            f"{row['refusals']} / {row['base_refusals']} |"
        )


if __name__ == "__main__":
    main()
