"""Training metrics: one console line per logged step and a JSONL record in the checkpoint folder."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger("automodel")


@dataclass
class LoggingConfig:
    """The `logging` section."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_file: str = "metrics.jsonl"
    progress_bar: bool = True


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_train_line(record: dict, max_steps: int) -> str:
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | grad_norm {record['grad_norm']:.3f} | "
            f"lr {record['lr']:.2e} | tokens/s {record['tokens_per_s']:,.0f} | "
            f"elapsed {format_duration(record['elapsed_s'])} | eta {format_duration(record['eta_s'])}")


class MetricsLogger:
    """Appends JSON records to `<checkpoint_dir>/metrics.jsonl` (when enabled) and prints console lines."""

    def __init__(self, path: Path | None, echo=logger.info, resume_step: int = 0):
        self.path = path
        self.echo = echo
        self.start = time.perf_counter()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._keep_until(resume_step)

    def _keep_until(self, step: int) -> None:
        """A fresh run starts an empty file; a resumed one drops what the interrupted run logged after its
        checkpoint, so every step appears once."""
        kept = []
        if step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def log_train(self, record: dict, max_steps: int) -> None:
        self.write({"kind": "train", **record})
        self.echo(format_train_line(record, max_steps))

    def log_validation(self, step: int, val_loss: float, tokens: int) -> None:
        self.write({"kind": "validation", "step": step, "val_loss": val_loss, "val_tokens": tokens})
        self.echo(f"step {step} | validation loss {val_loss:.4f} over {tokens:,} label tokens")
