"""Torchmetrics metrics for information extraction and coreference resolution."""

from lightning_modules.metrics.extraction import CorefMetrics, SetF1

__all__ = ["CorefMetrics", "SetF1"]
