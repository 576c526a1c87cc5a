"""Optimizers that torch does not ship."""

from lightning_modules.optim.sophia import Sophia, gauss_newton_bartlett, hutchinson

__all__ = ["Sophia", "gauss_newton_bartlett", "hutchinson"]
