"""`metrics.png`: training/validation loss, learning rate and tokens/s against step, drawn from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from automodel.errors import UserError

PLOT_NAME = "metrics.png"


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"no metrics file at {path}: pass a checkpoint_dir of a run (it holds metrics.jsonl)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not valid JSON: {err}") from None
    return records


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(metrics_path: Path, output: Path | None = None) -> Path:
    """Draw the run's curves into `output` (default: metrics.png next to the metrics file); headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    if not any(r.get("kind") == "train" for r in records):
        raise UserError(f"{metrics_path} has no training records yet: nothing to plot")
    output = output or metrics_path.with_name(PLOT_NAME)
    # Fixed margins, not a layout engine: constrained_layout re-measured every label and took most of the drawing
    # time, which every run pays at its end.
    figure, ((loss_ax, lr_ax), (speed_ax, memory_ax)) = plt.subplots(2, 2, figsize=(11, 7))
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.9, wspace=0.2, hspace=0.35)
    loss_ax.plot(*_series(records, "train", "loss"), marker=".", label="train")
    loss_ax.plot(*_series(records, "validation", "val_loss"), marker="o", label="validation")
    loss_ax.set(title="loss", xlabel="step")
    loss_ax.legend()
    lr_ax.plot(*_series(records, "train", "lr"), marker=".")
    lr_ax.set(title="learning rate", xlabel="step")
    speed_ax.plot(*_series(records, "train", "tokens_per_s"), marker=".", label="tokens (no padding)")
    speed_ax.plot(*_series(records, "train", "label_tokens_per_s"), marker=".", label="label tokens")
    speed_ax.set(title="tokens/s", xlabel="step")
    speed_ax.legend()
    memory_ax.plot(*_series(records, "train", "peak_memory_gb"), marker=".")
    memory_ax.set(title="peak memory (GB)", xlabel="step")
    for axis in (loss_ax, lr_ax, speed_ax, memory_ax):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(metrics_path.parent.name)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
