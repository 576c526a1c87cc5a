"""Sophia: the update rule by hand, SophiaG as an oracle, both Hessian estimators, the
refresh schedule, and resume with the optimizer state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_modules.optim import Sophia, gauss_newton_bartlett, hutchinson
from tests.test_causal_lm_training import _checkpoint, _fit, _write_records


def test_update_rule_by_hand() -> None:
    parameter = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = Sophia(
        [parameter], lr=0.1, betas=(0.5, 0.9), rho=2.0, weight_decay=0.1, hessian_interval=10
    )
    optimizer.update_hessian([torch.tensor([1.0, 0.0, 10.0])])
    # h = 0.1 * [1, 0, 10] = [0.1, 0, 1]
    parameter.grad = torch.tensor([0.4, 0.2, -1.0])
    optimizer.step()
    # m = 0.5 * g = [0.2, 0.1, -0.5]; theta *= 1 - 0.01; ratio = min(|m| / (2 h + eps), 1):
    # [0.2 / 0.2, 0.1 / eps, 0.5 / 2] clipped = [1, 1, 0.25]; theta -= 0.1 sign(m) ratio.
    expected = torch.tensor([1.0, -2.0, 0.5]) * 0.99 - 0.1 * torch.tensor([1.0, 1.0, -0.25])
    torch.testing.assert_close(parameter.data, expected)
    parameter.grad = torch.tensor([0.0, 0.0, 0.0])
    optimizer.step()
    # m = 0.5 m = [0.1, 0.05, -0.25]; ratio = [0.5, 1, 0.125].
    expected = expected * 0.99 - 0.1 * torch.tensor([0.5, 1.0, -0.125])
    torch.testing.assert_close(parameter.data, expected)
    assert optimizer.steps_taken == 2
    assert optimizer.state[parameter]["step"].item() == 2


def test_matches_sophiag_oracle() -> None:
    sophia_opt = pytest.importorskip("sophia_opt")
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    oracle_model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)
    )
    oracle_model.load_state_dict(ours_model.state_dict())
    initial = ours_model[0].weight.detach().clone()

    settings = {"lr": 0.02, "betas": (0.9, 0.95), "rho": 0.05, "weight_decay": 0.1}
    ours = Sophia(ours_model.parameters(), hessian_interval=3, **settings)
    oracle = sophia_opt.SophiaG(oracle_model.parameters(), **settings)

    batch_size = 8
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        inputs = torch.randn(batch_size, 4, generator=generator)
        targets = torch.randint(0, 2, (batch_size,), generator=generator)
        if ours.hessian_due():
            # The same squared gradient for both: ours stores batch_size * g^2, SophiaG
            # stores g^2 and multiplies rho by bs at every step.
            gradients = []
            for model in (ours_model, oracle_model):
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(inputs), targets).backward()
                gradients.append([p.grad.clone() for p in model.parameters()])
            ours.update_hessian([batch_size * g * g for g in gradients[0]])
            oracle.update_hessian()
        for model, optimizer in ((ours_model, ours), (oracle_model, oracle)):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            if optimizer is oracle:
                optimizer.step(bs=batch_size)
            else:
                optimizer.step()

    for mine, theirs in zip(ours_model.parameters(), oracle_model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)
    assert not torch.equal(ours_model[0].weight, initial)  # the steps moved the weights


def test_gauss_newton_bartlett_is_unbiased() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 4, bias=False)
    inputs = torch.randn(1, 3)
    logits = layer(inputs)
    probabilities = logits.softmax(dim=-1).detach()[0]
    # The Gauss-Newton diagonal for W: (diag(p) - p p^T)_kk x_j^2 = p_k (1 - p_k) x_j^2.
    exact = (probabilities * (1 - probabilities)).unsqueeze(1) * inputs[0].pow(2).unsqueeze(0)
    generator = torch.Generator().manual_seed(2)
    draws = 4000
    total = torch.zeros_like(layer.weight)
    for _ in range(draws):
        (estimate,) = gauss_newton_bartlett(layer(inputs), [layer.weight], generator=generator)
        total += estimate
    # The standard error of the mean is below 4% of the exact value at 4,000 draws.
    torch.testing.assert_close(total / draws, exact, rtol=0.1, atol=1e-4)


def test_gauss_newton_bartlett_scales_by_counted_positions() -> None:
    layer = torch.nn.Linear(2, 3)
    inputs = torch.randn(2, 5, 2)
    logits = layer(inputs)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True  # 3 counted positions
    generator = torch.Generator().manual_seed(0)
    (estimate,) = gauss_newton_bartlett(layer(inputs), [layer.bias], mask, generator)
    # Replay the same draws: labels from the same generator over the same 3 positions.
    replay = torch.Generator().manual_seed(0)
    counted = logits[mask]
    labels = torch.multinomial(counted.softmax(dim=-1).detach(), 1, generator=replay).squeeze(1)
    (gradient,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(counted, labels), [layer.bias]
    )
    torch.testing.assert_close(estimate, 3 * gradient**2)
    with pytest.raises(ValueError, match="no counted positions"):
        gauss_newton_bartlett(layer(inputs), [layer.bias], torch.zeros(2, 5, dtype=torch.bool))


def test_hutchinson_mean_is_the_hessian_diagonal() -> None:
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0]))
    # Non-diagonal, positive definite: one draw u * (A u) differs from diag(A).
    hessian = torch.tensor([[3.0, 1.0, 0.5], [1.0, 2.0, -0.8], [0.5, -0.8, 1.5]])
    generator = torch.Generator().manual_seed(0)
    draws = [hutchinson(0.5 * theta @ hessian @ theta, [theta], generator)[0] for _ in range(2000)]
    assert not torch.allclose(draws[0], hessian.diagonal())
    # Each entry is a_ii plus a sum of +-a_ij, at least 3 - 1.5 > 0, so no clamping; the
    # mean over 2,000 draws is within 0.1 of the diagonal (standard error below 0.03).
    torch.testing.assert_close(torch.stack(draws).mean(0), hessian.diagonal(), atol=0.1, rtol=0)


def test_hutchinson_clamps_negative_curvature_and_linear_terms() -> None:
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    linear = torch.nn.Parameter(torch.tensor([0.5]))
    loss = 0.5 * (torch.tensor([3.0, -2.0]) * theta**2).sum() + 4.0 * linear.sum()
    estimate, linear_estimate = hutchinson(loss, [theta, linear], torch.Generator())
    # u * (A u) = a u^2 = a for a diagonal A; the negative entry is clamped to 0.
    torch.testing.assert_close(estimate, torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(linear_estimate, torch.tensor([0.0]))


def test_hessian_refresh_schedule() -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = Sophia([parameter], hessian_interval=3)
    due = []
    for _ in range(7):
        due.append(optimizer.hessian_due())
        parameter.grad = torch.ones(1)
        optimizer.step()
    assert due == [True, False, False, True, False, False, True]


def test_state_dict_round_trip_continues_identically() -> None:
    def run(steps: int, state: dict | None = None) -> tuple[torch.nn.Parameter, Sophia]:
        parameter = torch.nn.Parameter(torch.tensor([0.5, -0.5]))
        optimizer = Sophia([parameter], lr=0.1, hessian_interval=2)
        if state is not None:
            parameter.data.copy_(state["parameter"])
            optimizer.load_state_dict(state["optimizer"])
        for _ in range(steps):
            if optimizer.hessian_due():
                optimizer.update_hessian([parameter.detach().abs() + 1])
            parameter.grad = parameter.detach() * 2
            optimizer.step()
        return parameter, optimizer

    straight, _ = run(5)
    first, optimizer = run(3)
    saved = {"parameter": first.detach().clone(), "optimizer": optimizer.state_dict()}
    assert saved["optimizer"]["sophia"] == {"steps_taken": 3}
    resumed, resumed_optimizer = run(2, saved)
    torch.testing.assert_close(resumed, straight, atol=0, rtol=0)
    assert resumed_optimizer.steps_taken == 5


def test_lightning_resume_with_sophia(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = _write_records(tmp_path / "qa.jsonl")
    sophia = [
        "--optimizer",
        "lightning_modules.optim.Sophia",
        "--optimizer.lr",
        "0.01",
        "--optimizer.hessian_interval",
        "4",
        "--trainer.callbacks+=callbacks.hessian.HessianRefresh",
    ]
    straight = _fit(tmp_path / "straight", data, *sophia)
    stop = json.dumps(
        {"class_path": "tests.test_training.StopAfterEpochs", "init_args": {"epochs": 1}}
    )
    first = _fit(tmp_path / "first", data, *sophia, f"--trainer.callbacks+={stop}")
    resumed = _fit(tmp_path / "resumed", data, *sophia, "--ckpt_path", str(_checkpoint(first)))
    assert resumed.trainer.global_step == straight.trainer.global_step == 6

    expected = torch.load(_checkpoint(straight), map_location="cpu", weights_only=True)
    actual = torch.load(_checkpoint(resumed), map_location="cpu", weights_only=True)
    for name, value in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], value), name
    # The refresh at step 4 (after 2 steps in the resumed run) needs the restored counter.
    optimizer = resumed.trainer.optimizers[0]
    assert optimizer.steps_taken == 6
    hessians = [state["hessian"] for state in optimizer.state.values()]
    assert any(h.abs().sum() > 0 for h in hessians)
    reference = straight.trainer.optimizers[0]
    for mine, theirs in zip(
        hessians, [s["hessian"] for s in reference.state.values()], strict=True
    ):
        assert torch.equal(mine, theirs)
