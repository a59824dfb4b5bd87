"""`automodel plot CHECKPOINT_DIR [--output PNG]`: draw a run's metrics.jsonl as metrics.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from automodel.errors import UserError


def metrics_file_of(run_dir: Path) -> Path:
    """The run's metrics file: `logging.metrics_file` of its config.yaml, else metrics.jsonl."""
    from automodel.config.redact import read_run_config

    config = run_dir / "config.yaml"
    cfg = read_run_config(config) if config.is_file() else None
    name = ((cfg or {}).get("logging") or {}).get("metrics_file", "metrics.jsonl")
    return run_dir / name


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="automodel plot",
        description="Plot training and validation loss, learning rate, tokens/s and peak memory against step "
                    "from a run's metrics file (works while the run is still going).")
    parser.add_argument("run", help="a checkpoint_dir (holding metrics.jsonl) or a metrics .jsonl file")
    parser.add_argument("--output", help="PNG to write (default: metrics.png next to the metrics file)")
    args = parser.parse_args(argv)
    from automodel.logging.plot import plot_metrics

    path = Path(args.run)
    if not path.exists():
        raise UserError(f"not found: {path} (expected a checkpoint_dir or its metrics.jsonl)")
    metrics = metrics_file_of(path) if path.is_dir() else path
    print(plot_metrics(metrics, Path(args.output) if args.output else None))
    return 0
