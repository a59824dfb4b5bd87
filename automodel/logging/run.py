"""Build a run's metrics sinks and throughput meter from the `logging` section (rank 0 writes, others count)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from automodel.config import parse_section
from automodel.logging.backends import build_backends
from automodel.logging.metrics import LoggingConfig, MetricsLogger
from automodel.logging.rank import is_main_process
from automodel.logging.throughput import MfuConfig, ThroughputMeter, device_peak_tflops, flops_per_token


def open_metrics(log_cfg: LoggingConfig, run_dir: Path, cfg: dict[str, Any], resume_step: int = 0) -> MetricsLogger:
    """On rank 0: metrics.jsonl in `run_dir`, console lines and the configured trackers; elsewhere: silent."""
    if not is_main_process():
        return MetricsLogger(None, echo=lambda *_: None)
    backends = build_backends(log_cfg, run_dir, cfg, resume_step)
    return MetricsLogger(run_dir / log_cfg.metrics_file, resume_step=resume_step, backends=backends)


def throughput_meter(model: torch.nn.Module, device: torch.device, log_cfg: LoggingConfig) -> ThroughputMeter:
    from automodel.peft import count_parameters

    total, trainable = count_parameters(model)
    mfu = parse_section(MfuConfig, log_cfg.mfu, "logging.mfu")
    peak = device_peak_tflops(device, mfu.peak_tflops)
    if peak is None and device.type == "cuda":
        logging.getLogger("automodel").info("MFU not reported: unknown peak for %s; set logging.mfu.peak_tflops",
                                            torch.cuda.get_device_name(device))
    return ThroughputMeter(device, flops_per_token(total, trainable), peak)
