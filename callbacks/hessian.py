"""The Hessian refresh of second-order optimizers such as Sophia, for any LightningModule.

An optimizer takes part by providing ``hessian_due() -> bool``, ``estimator`` (``"gnb"``
or ``"hutchinson"``), ``trainable_parameters()`` and ``update_hessian(estimates)``, as
:class:`lightning_modules.optim.Sophia` does. A module takes part by providing

- ``hessian_logits(batch) -> (logits [..., V], mask [...])`` for the Gauss-Newton-Bartlett
  estimate (labels are sampled from these logits), and/or
- ``hessian_loss(batch) -> Tensor``, the training loss with its graph, for Hutchinson.

Before each optimizer step for which the optimizer reports ``hessian_due()``, the
callback computes the estimate on that step's training batch and passes it on. The
estimate uses ``torch.autograd.grad``, so the gradients of the step are not touched.
With gradient accumulation, the estimate uses the last batch of the accumulation.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_modules.optim import gauss_newton_bartlett, hutchinson


class HessianRefresh(pl.Callback):
    """Refresh the Hessian estimate of optimizers that request it (see the module docstring).

    Args:
        seed: seed of the label draws (GNB) and the Rademacher probes (Hutchinson). The
            draws of step s use seed + s, so a resumed run draws what an uninterrupted
            one would.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._batch: Any = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if not callable(getattr(optimizer, "hessian_due", None)) or not optimizer.hessian_due():
            return
        generator = torch.Generator().manual_seed(self.seed + trainer.global_step)
        parameters = optimizer.trainable_parameters()
        with torch.enable_grad():
            if optimizer.estimator == "gnb":
                method = getattr(pl_module, "hessian_logits", None)
                if method is None:
                    raise TypeError(
                        f"{type(pl_module).__name__} has no hessian_logits(batch) method, which "
                        "the Gauss-Newton-Bartlett estimate needs; add it, or set the "
                        "optimizer's estimator to hutchinson and provide hessian_loss(batch)."
                    )
                logits, mask = method(self._batch)
                estimates = gauss_newton_bartlett(logits, parameters, mask, generator)
            else:
                method = getattr(pl_module, "hessian_loss", None)
                if method is None:
                    raise TypeError(
                        f"{type(pl_module).__name__} has no hessian_loss(batch) method, which "
                        "the Hutchinson estimate needs; add it."
                    )
                estimates = hutchinson(method(self._batch), parameters, generator)
        if trainer.world_size > 1:
            # autograd.grad bypasses DDP's gradient all-reduce; without this mean every
            # process would keep its own h and the replicas would drift apart.
            estimates = [
                None if e is None else trainer.strategy.reduce(e, reduce_op="mean")
                for e in estimates
            ]
        optimizer.update_hessian(estimates)
