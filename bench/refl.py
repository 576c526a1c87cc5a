"""Benchmark one ReFL training step against the sum of its parts.

The ReFL step of :class:`lightning_modules.refl.ReFL` (without the pre-training loss) is
timed whole: guided DDIM steps without gradients, one guided UNet step with gradients,
decoding x0, the reward forward pass, the backward pass and the AdamW update. Then each
part is timed alone on the same inputs:

(a) the no-grad DDIM steps, (b) the grad step's forward and backward through the UNet
(with the gradient of the reward loss replaced by a fixed tensor), (c) decoding x0 to
pixels, (d) the reward forward and backward with respect to the pixels, (e) the AdamW update,
and (f) encoding the prompts and the empty prompt (the text encoder is frozen). The
ratio whole / (a + ... + f) close to 1 means the step adds no hidden work (no graph kept
across the no-grad steps, no extra copies).

Models: the UNet and text encoder of configs/text_to_image/digits.yaml (pixel space)
at two resolutions, and the untrained reward model of configs/vp_score/digits.yaml.
Medians over ``--repeats`` after one warm-up.

Usage: PYTHONPATH=. python bench/refl.py [--repeats 5] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from callbacks.export import export_module  # noqa: E402
from lightning_modules.backbones import Backbone  # noqa: E402
from lightning_modules.refl import ReFL  # noqa: E402
from lightning_modules.reward_model import VPScore  # noqa: E402
from lightning_modules.text_to_image import DiffusionComponents  # noqa: E402

STEPS = 10
GRAD_STEP = 9  # 0-based: nine no-grad steps, then the grad step


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(resolution: int, reward_dir: Path) -> ReFL:
    config = yaml.safe_load((REPOSITORY / "configs" / "text_to_image" / "digits.yaml").read_text())
    components = dict(config["model"]["init_args"]["components"])
    components["unet"] = {**components["unet"], "sample_size": resolution}
    torch.manual_seed(0)
    return ReFL(
        DiffusionComponents(**components),
        reward_model=str(reward_dir),
        t1=GRAD_STEP,
        t2=GRAD_STEP,
        num_inference_steps=STEPS,
        max_prompt_length=16,
        learning_rate=1e-4,
    ).train()


def measure(model: ReFL, batch_size: int, repeats: int) -> dict[str, float]:
    prompts = [f"a handwritten digit {word}" for word in ["one", "seven"]] * (batch_size // 2)
    optimizer = model.configure_optimizers()

    def whole() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        model.training_step({"prompts": prompts}, 0).backward()
        optimizer.step()

    scheduler = model.sampling_scheduler()
    text = model.encode_prompts(prompts).detach()
    empty = model.encode_prompts([""] * len(prompts)).detach()
    guidance = model.hparams.guidance_scale

    def no_grad_steps() -> torch.Tensor:
        with torch.no_grad():
            latents = model.initial_noise(len(prompts), 1)
            for timestep in scheduler.timesteps[:GRAD_STEP]:
                output = model.guided_prediction(latents, timestep, text, empty, guidance)
                latents = scheduler.step(output, timestep, latents).prev_sample
        return latents

    latents = no_grad_steps()
    timestep = scheduler.timesteps[GRAD_STEP]
    upstream = torch.randn_like(latents)

    def grad_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        output = model.guided_prediction(latents, timestep, text, empty, guidance)
        output.backward(upstream)

    x0 = latents.clone()

    def decode() -> None:
        with torch.no_grad():
            model.model_space_to_images(x0)

    images = model.model_space_to_images(x0).detach()

    def reward() -> None:
        pixels = images.clone().requires_grad_(True)
        rewards, _ = model.rewards(prompts, pixels)
        model.reward_loss(rewards).backward()

    grad_step()  # gradients exist, so AdamW has state to update

    def update() -> None:
        optimizer.step()

    def encode() -> None:
        with torch.no_grad():
            model.encode_prompts(prompts)
            model.encode_prompts([""] * len(prompts))

    return {
        "whole step": median_seconds(whole, repeats),
        "(a) no-grad steps": median_seconds(no_grad_steps, repeats),
        "(b) grad step fwd+bwd": median_seconds(grad_step, repeats),
        "(c) decode": median_seconds(decode, repeats),
        "(d) reward fwd+bwd": median_seconds(reward, repeats),
        "(e) AdamW update": median_seconds(update, repeats),
        "(f) prompt encoding": median_seconds(encode, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step (even)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    arguments = parser.parse_args()

    reward_config = yaml.safe_load(
        (REPOSITORY / "configs" / "vp_score" / "digits.yaml").read_text()
    )
    reward_arguments = dict(reward_config["model"]["init_args"])
    backbone = Backbone(**reward_arguments.pop("backbone"))
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        reward_dir = Path(directory) / "reward"
        export_module(VPScore(backbone, **reward_arguments).eval(), reward_dir)
        for resolution in arguments.resolutions:
            model = build(resolution, reward_dir)
            results[resolution] = measure(model, arguments.batch_size, arguments.repeats)

    names = list(next(iter(results.values())))
    header = "| measurement | " + " | ".join(f"{r} x {r}" for r in results) + " |"
    print(
        f"torch threads {torch.get_num_threads()}, batch {arguments.batch_size}, {STEPS} DDIM steps"
    )
    print(header)
    print("|---|" + "---|" * len(results))
    for name in names:
        print(
            f"| {name} | " + " | ".join(f"{results[r][name] * 1000:.0f} ms" for r in results) + " |"
        )
    parts = {r: sum(v for k, v in results[r].items() if k != "whole step") for r in results}
    print("| sum of parts | " + " | ".join(f"{parts[r] * 1000:.0f} ms" for r in results) + " |")
    print(
        "| **whole / sum** | "
        + " | ".join(f"**{results[r]['whole step'] / parts[r]:.2f}**" for r in results)
        + " |"
    )


if __name__ == "__main__":
    main()
