"""Which checkpoint to resume from, and whether it belongs to this config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from automodel.checkpoint.save import latest_step_dir
from automodel.config.redact import read_run_config, redact
from automodel.errors import UserError

# Settings that decide what the saved weights and data order mean. Everything else (max_steps, logging,
# validation and checkpoint intervals, local_batch_size, number of processes) may change on resume.
MUST_MATCH = ("model", "peft", "dataset", "seed", "step_scheduler.global_batch_size", "tokenizer", "teacher_model",
              "kd_ratio", "kd_loss_fn")


def find_restore_dir(checkpoint_dir: str, restore_from: str | None) -> Path | None:
    """`LATEST`: the newest complete checkpoint, or None for a fresh run; a path: that step folder; None: fresh."""
    if restore_from is None:
        return None
    if restore_from == "LATEST":
        found = latest_step_dir(checkpoint_dir)
        marker = Path(checkpoint_dir) / "LATEST"
        if found is None and marker.is_file():  # starting over silently would retrain from scratch
            raise UserError(f"{marker} names {marker.read_text().strip()!r}, which is not a step folder there; "
                            "fix LATEST or set checkpoint.restore_from")
        return found
    path = Path(restore_from)
    if path.is_file():
        raise UserError(f"checkpoint.restore_from: {restore_from} is a file; expected a step folder")
    if not path.is_dir():
        raise UserError(f"checkpoint.restore_from: step folder not found: {restore_from}")
    return path


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _first_difference(saved: Any, current: Any, key: str) -> tuple[str, Any, Any] | None:
    if isinstance(saved, dict) and isinstance(current, dict):
        for name in sorted(saved.keys() | current.keys()):
            found = _first_difference(saved.get(name), current.get(name), f"{key}.{name}")
            if found:
                return found
        return None
    return None if saved == current else (key, saved, current)


def check_compatible(step_dir: Path, cfg: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model, adapter, data or global batch differ from this config."""
    saved_file = step_dir / "config.yaml"
    if not saved_file.is_file():
        raise UserError(f"checkpoint.restore_from: {step_dir} has no config.yaml: not an automodel checkpoint")
    # Both as written down: the saved file's `${oc.env:...}` resolved again, secret-looking values redacted in both.
    saved, cfg = redact(read_run_config(saved_file)), redact(cfg)
    for key in MUST_MATCH:
        found = _first_difference(_get(saved, key), _get(cfg, key), key)
        if found:
            name, old, new = found
            raise UserError(f"checkpoint.restore_from: {step_dir} was trained with {name}={old!r} but this config "
                            f"has {new!r}; use the original setting, another checkpoint.checkpoint_dir, or "
                            "checkpoint.restore_from: null to start fresh")
