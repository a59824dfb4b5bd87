"""Checkpoint folders that are either complete or absent.

Layout: `<checkpoint_dir>/step_<N>/model/` is a folder Hugging Face libraries load unchanged (full
safetensors + config for SFT, the PEFT adapter for LoRA, plus the tokenizer). Other state (optimizer,
data position, RNG) goes next to `model/` in the same step folder. A step folder is written under a
temporary name, fsynced, then renamed; `LATEST` names the newest complete one and moves only after.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

LATEST = "LATEST"


@dataclass
class CheckpointConfig:
    """The `checkpoint` section."""

    checkpoint_dir: str = "checkpoints"
    enabled: bool = True


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """Replace a small text file in one rename, so readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_step(checkpoint_dir: str | os.PathLike, step: int, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_folder)`, then publish it as `step_<step>` and point LATEST at it."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed mid-save: never published, safe to drop
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)  # an older run's folder for the same step; LATEST still names it below
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomically(root / LATEST, final.name + "\n")
    return final


def latest_step_dir(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The step folder LATEST names, or None when there is no complete checkpoint."""
    marker = Path(checkpoint_dir) / LATEST
    if not marker.is_file():
        return None
    path = Path(checkpoint_dir) / marker.read_text().strip()
    return path if path.is_dir() else None


def save_hf_model(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """What HF loads: `PeftModel.save_pretrained` writes only the adapter, a plain model writes all weights.

    `state_dict` replaces the model's own tensors (gathered full copies of a sharded model)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def write_config(cfg: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
