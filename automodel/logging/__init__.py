"""Console and file metrics for training runs."""

from automodel.logging.metrics import LoggingConfig, MetricsLogger

__all__ = ["LoggingConfig", "MetricsLogger"]
