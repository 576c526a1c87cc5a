"""Sophia: a clipped second-order optimizer with a diagonal Hessian estimate (Liu et al., 2023).

Per parameter, with gradient g, learning rate lr and weight decay wd:

    m <- beta1 m + (1 - beta1) g
    theta <- theta (1 - lr wd)                              (decoupled weight decay)
    theta <- theta - lr sign(m) min(|m| / (rho h + eps), 1)

and every ``hessian_interval`` steps the diagonal Hessian estimate h is refreshed from a
new estimate h_hat as h <- beta2 h + (1 - beta2) h_hat. Two estimators are provided:

- Gauss-Newton-Bartlett (:func:`gauss_newton_bartlett`): sample labels from the model's
  own output distribution, backpropagate the mean loss on them, and take B g_hat^2, with
  B the number of examples the mean runs over. For the cross-entropy loss this is an
  unbiased estimate of the Gauss-Newton diagonal.
- Hutchinson (:func:`hutchinson`): u * (H u) for a Rademacher vector u, clamped at zero
  so the estimate stays positive.

The defaults of lr, betas, rho and weight decay are those of SophiaG in sophia-opt 0.2.2,
a PyPI packaging of the authors' optimizer. NOTE: eps 1e-15 is SophiaG's constant, and a
refresh every 10 steps is the paper's k as this project recalls it, not checked. SophiaG
multiplies rho by the batch size at every step and stores the unscaled g_hat^2. That
gives the same update as the scaled estimate here when the batch size is fixed.
PyTorch ships no Sophia. ``sophia-opt`` on PyPI packages the authors' SophiaG, but its
GNB estimate lives in their training loop, not in the optimizer. So it is the oracle of
the tests (a dev dependency) rather than a runtime dependency.

The refresh is requested through :meth:`Sophia.hessian_due` and supplied through
:meth:`Sophia.update_hessian`; :class:`callbacks.hessian.HessianRefresh` does both for a
LightningModule, so a module needs no knowledge of the optimizer class.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


class Sophia(torch.optim.Optimizer):
    """Sophia (see the module docstring).

    Args:
        params: parameters or parameter groups.
        lr: learning rate; apart from weight decay, a coordinate moves at most ``lr`` per step.
        betas: (beta1, beta2), decay of the gradient momentum and of the Hessian estimate.
        rho: clipping scale; smaller rho means more coordinates take the full ``lr`` step.
        weight_decay: decoupled weight decay.
        eps: added to rho * h so that coordinates with h = 0 take the full step.
        hessian_interval: steps between Hessian refreshes (k).
        estimator: ``gnb`` (Gauss-Newton-Bartlett) or ``hutchinson``; read by
            :class:`callbacks.hessian.HessianRefresh` to choose how to estimate.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        hessian_interval: int = 10,
        estimator: Literal["gnb", "hutchinson"] = "gnb",
    ):
        if lr < 0 or rho <= 0 or weight_decay < 0 or eps <= 0:
            raise ValueError(
                f"Invalid Sophia arguments: lr={lr} and weight_decay={weight_decay} must be "
                f"non-negative, rho={rho} and eps={eps} positive."
            )
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"Invalid Sophia arguments: betas={betas} must be in [0, 1).")
        if hessian_interval < 1:
            raise ValueError(
                f"Invalid Sophia arguments: hessian_interval={hessian_interval} must be at least 1."
            )
        if estimator not in ("gnb", "hutchinson"):
            raise ValueError(
                f"Invalid Sophia arguments: estimator={estimator!r}; use 'gnb' or 'hutchinson'."
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "rho": rho,
            "weight_decay": weight_decay,
            "eps": eps,
        }
        super().__init__(params, defaults)
        self.hessian_interval = hessian_interval
        self.estimator = estimator
        # Optimizer steps taken so far; checkpoints store it with the rest of the state.
        self.steps_taken = 0

    def _state(self, parameter: Tensor) -> dict:
        state = self.state[parameter]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        return state

    def hessian_due(self) -> bool:
        """Return True when the next step should use a refreshed Hessian estimate.

        That is before steps 1, k + 1, 2k + 1, ... (1-based), so the first step already
        has an estimate.
        """
        return self.steps_taken % self.hessian_interval == 0

    def trainable_parameters(self) -> list[Tensor]:
        """Return the parameters of every group that require gradients, in group order."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[Tensor | None]) -> None:
        """Fold new diagonal Hessian estimates into h (one per :meth:`trainable_parameters` entry).

        An entry of None leaves that parameter's h unchanged.
        """
        parameters = self.trainable_parameters()
        if len(estimates) != len(parameters):
            raise ValueError(
                f"update_hessian got {len(estimates)} estimates for {len(parameters)} "
                "trainable parameters; pass one per trainable_parameters() entry."
            )
        # Keyed by identity: list.index would compare tensors by value.
        positions = {id(parameter): index for index, parameter in enumerate(parameters)}
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for parameter in group["params"]:
                if id(parameter) not in positions:
                    continue
                estimate = estimates[positions[id(parameter)]]
                if estimate is None:
                    continue
                hessian = self._state(parameter)["hessian"]
                hessian.mul_(beta2).add_(estimate.to(hessian.dtype), alpha=1 - beta2)

    @torch.no_grad()
    def step(self, closure=None):
        """Take one Sophia step with the current gradients (and h)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1 = group["betas"][0]
            lr, rho, eps = group["lr"], group["rho"], group["eps"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                if parameter.grad.is_sparse:
                    raise RuntimeError("Sophia does not support sparse gradients.")
                state = self._state(parameter)
                state["step"] += 1
                parameter.mul_(1 - lr * group["weight_decay"])
                momentum = state["exp_avg"]
                momentum.mul_(beta1).add_(parameter.grad, alpha=1 - beta1)
                ratio = (momentum.abs() / (rho * state["hessian"] + eps)).clamp(max=1)
                parameter.addcmul_(momentum.sign(), ratio, value=-lr)
        self.steps_taken += 1
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["sophia"] = {"steps_taken": self.steps_taken}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sophia", {"steps_taken": 0})
        super().load_state_dict(state_dict)
        self.steps_taken = int(extra["steps_taken"])


def gauss_newton_bartlett(
    logits: Tensor,
    parameters: Sequence[Tensor],
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Return Gauss-Newton-Bartlett diagonal Hessian estimates, one per parameter.

    Args:
        logits: [..., V] outputs of the model on a batch, with the graph to ``parameters``.
        parameters: the parameters to estimate for (those of ``Sophia.trainable_parameters``).
        mask: [...] True where a position counts (e.g. response tokens); None counts all.
        generator: CPU generator for the label draws.

    The labels are drawn from softmax(logits); the mean cross-entropy over the N counted
    positions is backpropagated, and the estimate is N g_hat^2.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    keep = torch.ones(len(flat), dtype=torch.bool, device=flat.device)
    if mask is not None:
        keep = mask.reshape(-1).to(flat.device, torch.bool)
    flat = flat[keep]
    count = len(flat)
    if count == 0:
        raise ValueError("gauss_newton_bartlett got no counted positions; check the mask.")
    with torch.no_grad():
        probabilities = flat.float().softmax(dim=-1).cpu()
        labels = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
    loss = F.cross_entropy(flat.float(), labels.to(flat.device))
    gradients = torch.autograd.grad(loss, list(parameters), allow_unused=True)
    return [None if g is None else count * g * g for g in gradients]


def hutchinson(
    loss: Tensor, parameters: Sequence[Tensor], generator: torch.Generator | None = None
) -> list[Tensor]:
    """Return Hutchinson diagonal Hessian estimates max(u * (H u), 0), one per parameter.

    ``loss`` must still have its graph; u is a Rademacher vector (entries +-1) drawn from
    ``generator`` on the CPU. Costs two backward passes: the gradient with its graph,
    then the Hessian-vector product. A parameter whose gradient does not depend on any
    parameter (the loss is linear in it) gets a zero estimate.
    """
    parameters = list(parameters)
    gradients = torch.autograd.grad(loss, parameters, create_graph=True, allow_unused=True)
    gradients = [
        torch.zeros_like(p) if g is not None and g.grad_fn is None else g
        for p, g in zip(parameters, gradients, strict=True)
    ]
    used = [
        (p, g) for p, g in zip(parameters, gradients, strict=True) if g is not None and g.grad_fn
    ]
    probes = [
        (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype)
        for p, _ in used
    ]
    products = torch.autograd.grad(
        [g for _, g in used], [p for p, _ in used], grad_outputs=probes, allow_unused=True
    )
    estimates = {
        id(p): torch.zeros_like(p) if hv is None else (u * hv).clamp(min=0)
        for (p, _), u, hv in zip(used, probes, products, strict=True)
    }
    return [
        None if g is None else estimates.get(id(p), torch.zeros_like(p))
        for p, g in zip(parameters, gradients, strict=True)
    ]
