"""Training metrics: one console line per logged step, a JSONL record in the checkpoint folder, and the same
values sent to any experiment tracker configured under `logging`."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from automodel.paths import check_not_link, check_plain_name, open_no_follow, write_text_no_follow

logger = logging.getLogger("automodel")


@dataclass
class LoggingConfig:
    """The `logging` section. `wandb`, `mlflow`, `tensorboard`: a mapping (`{}` for defaults) turns that
    tracker on; `mfu: {peak_tflops: N}` sets the device peak used for MFU."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_file: str = "metrics.jsonl"
    progress_bar: bool = True
    plot: bool = True
    mfu: dict | None = None
    wandb: dict | None = None
    mlflow: dict | None = None
    tensorboard: dict | None = None

    def __post_init__(self):
        check_plain_name(self.metrics_file, "logging.metrics_file")  # a file inside checkpoint_dir
        # Typos and missing tracker packages stop the run before the model loads, not after.
        from automodel.config import parse_section
        from automodel.logging.backends import backend_settings
        from automodel.logging.throughput import MfuConfig

        parse_section(MfuConfig, self.mfu, "logging.mfu")
        backend_settings(self)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_train_line(record: dict, max_steps: int) -> str:
    # The kd recipe's two terms (automodel/training/kd.py) follow the loss they make up.
    terms = f" (ce {record['ce_loss']:.4f}, kd {record['kd_loss']:.4f})" if "kd_loss" in record else ""
    line = (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f}{terms} | "
            f"grad_norm {record['grad_norm']:.3f} | lr {record['lr']:.2e} | tokens/s {record['tokens_per_s']:,.0f}")
    if "label_tokens_per_s" in record:
        line += f" (labels {record['label_tokens_per_s']:,.0f})"
    if "mfu" in record:
        line += f" | mfu {100 * record['mfu']:.3g}%"
    if "peak_memory_gb" in record:
        line += f" | mem {record['peak_memory_gb']:.2f}GB"
    return line + f" | elapsed {format_duration(record['elapsed_s'])} | eta {format_duration(record['eta_s'])}"


def numeric(record: dict, prefix: str) -> dict[str, float]:
    """The values a tracker charts: numbers other than the step, named `<prefix>/<key>`."""
    return {f"{prefix}/{key.removeprefix('val_')}": value for key, value in record.items()
            if key not in ("step", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool)}


class MetricsLogger:
    """Appends JSON records to `<checkpoint_dir>/metrics.jsonl` (when enabled), prints console lines and
    forwards the numbers to the configured trackers. As a context manager it closes them at the end,
    marking the tracker run failed when the block raised."""

    def __init__(self, path: Path | None, echo=logger.info, resume_step: int = 0, backends: list[Any] = ()):
        self.path = path
        self.echo = echo
        self.backends = list(backends)
        self.start = time.perf_counter()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_not_link(path, "logging.metrics_file")  # a planted link would have every record written there
            self._keep_until(resume_step)

    def _keep_until(self, step: int) -> None:
        """A fresh run starts an empty file; a resumed one drops what the interrupted run logged after its
        checkpoint, so every step appears once."""
        kept = []
        if step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text_no_follow(self.path, "".join(line + "\n" for line in kept), "logging.metrics_file")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open_no_follow(self.path, "logging.metrics_file", append=True) as handle:
                handle.write(json.dumps(record) + "\n")
        prefix = "train" if record["kind"] == "train" else "val"
        for backend in self.backends:
            backend.log_metrics(record["step"], numeric(record, prefix))

    def log_train(self, record: dict, max_steps: int) -> None:
        self.write({"kind": "train", **record})
        self.echo(format_train_line(record, max_steps))

    def log_validation(self, step: int, val_loss: float, tokens: int) -> None:
        self.write({"kind": "validation", "step": step, "val_loss": val_loss, "val_tokens": tokens})
        self.echo(f"step {step} | validation loss {val_loss:.4f} over {tokens:,} label tokens")

    def plot(self) -> Path | None:
        """Draw metrics.png next to the metrics file (None when there is no file or nothing to draw yet)."""
        if self.path is None or not self.path.is_file() or '"kind": "train"' not in self.path.read_text():
            return None
        from automodel.logging.plot import plot_metrics

        return plot_metrics(self.path)

    def close(self, failed: bool = False) -> None:
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close(failed=failed)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
