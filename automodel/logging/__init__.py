"""Watching a run: console lines, progress bars, metrics.jsonl, experiment trackers, plots and summaries."""

from automodel.logging.metrics import LoggingConfig, MetricsLogger
from automodel.logging.progress import progress_bar
from automodel.logging.rank import is_main_process, world_size
from automodel.logging.run import open_metrics, throughput_meter
from automodel.logging.summary import format_end_summary, format_start_banner

__all__ = ["LoggingConfig", "MetricsLogger", "format_end_summary", "format_start_banner", "is_main_process",
           "open_metrics", "progress_bar", "throughput_meter", "world_size"]
