"""Checkpoint folders that are either complete or absent.

Layout: `<checkpoint_dir>/step_<N>/model/` is a folder Hugging Face libraries load unchanged (full
safetensors + config for SFT, the PEFT adapter for LoRA, plus the tokenizer). Other state (optimizer,
data position, RNG) goes next to `model/` in the same step folder. A step folder is written under a
temporary name, fsynced, then renamed; `LATEST` names the newest complete one and moves only after.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from automodel.errors import UserError
from automodel.checkpoint.provenance import record_written
from automodel.paths import check_not_link, check_step_name, open_no_follow, write_text_no_follow

LATEST = "LATEST"


@dataclass
class CheckpointConfig:
    """The `checkpoint` section.

    `restore_from`: LATEST (resume from the newest complete checkpoint if there is one), a step folder, or null.
    `save_consolidated`: when to write the HF-loadable `model/` folder next to the training state.
    `max_shard_size`: the largest safetensors file of `model/` (bytes or a size like 5GB); larger models are
    written as `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`.
    """

    checkpoint_dir: str = "checkpoints"
    enabled: bool = True
    restore_from: str | None = "LATEST"
    keep_last_n: int | None = None
    save_consolidated: Literal["final", "every", "never"] = "final"
    # Resume from a step folder your runs did not write (its dcp/ state is unpickled): checkpoint/provenance.py.
    trust_pickled_state: bool = False
    max_shard_size: int | str = "50GB"  # of `model/`'s safetensors files; transformers' save_pretrained default

    def __post_init__(self):
        from huggingface_hub import split_state_dict_into_shards_factory

        existing = Path(self.checkpoint_dir)
        while not existing.exists() and existing != existing.parent:  # the part of the path already there
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            what = "" if existing == Path(self.checkpoint_dir) else f": {existing}"
            raise ValueError(f"checkpoint_dir {self.checkpoint_dir}{what} is a file; expected a folder (it is "
                             "created when missing)")
        if isinstance(self.max_shard_size, bool) or isinstance(self.max_shard_size, int) and self.max_shard_size < 1:
            raise ValueError(f"max_shard_size: expected a positive number of bytes, got {self.max_shard_size!r}")
        try:  # the planner the writer uses parses the size: an empty plan checks it
            split_state_dict_into_shards_factory({}, get_storage_size=len, filename_pattern="model{suffix}",
                                                 max_shard_size=self.max_shard_size)
        except ValueError as err:
            raise ValueError(f"max_shard_size: expected a size such as 5GB or 500MB, got "
                             f"{self.max_shard_size!r}") from err
        if self.keep_last_n is not None and self.keep_last_n < 1:
            raise ValueError(f"keep_last_n must be >= 1 or null, got {self.keep_last_n}")


def check_no_links(checkpoint_dir: str | os.PathLike, file_names: tuple[str, ...] = ()) -> None:
    """Before a run builds anything: none of the entries it writes or reads in `checkpoint_dir` (config.yaml,
    LATEST, step folders, the trackers' defaults, `file_names`) is a link, which a write would follow (the folder
    itself may be one)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return
    # What a run writes there by default: its config, LATEST, and the trackers' files and folders.
    names = ("config.yaml", LATEST, "metrics.png", "mlflow.db", "tensorboard", "wandb", *file_names)
    for path in [root / name for name in names] + sorted(root.glob("step_*")) + sorted(root.glob(".step_*")):
        check_not_link(path, "checkpoint.checkpoint_dir")


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
    with open_no_follow(tmp, "checkpoint") as handle:  # the rename then replaces a link at `path`, never follows it
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_step(checkpoint_dir: str | os.PathLike, step: int, write: Callable[[Path], None], *, is_main: bool = True,
              barrier: Callable[[], None] = lambda: None) -> Path:
    """Run `write(tmp_folder)` on every rank, then rank 0 publishes it as `step_<step>` and points LATEST at it.

    With several ranks, `barrier` keeps them in step: all write into the same temporary folder (sharded state),
    and nobody continues before the folder is published."""
    root = Path(checkpoint_dir)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.partial"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for path in (tmp, final):  # rmtree and the rename would act on the link's target, or fail half-way
            check_not_link(path, "checkpoint")
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed mid-save: never published, safe to drop
        tmp.mkdir()
    barrier()
    try:
        write(tmp)
        barrier()
        if is_main:
            _publish(root, tmp, final)
    except BaseException as err:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(err):
            previous = latest_step_dir(root)
            raise UserError(f"checkpoint: no space left on the device while saving {final}; the partial folder "
                            f"was removed, the previous checkpoint {previous or '(none)'} is intact") from err
        raise
    barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    _fsync_tree(tmp)
    if (tmp / "dcp").is_dir():  # before the rename: a step that is published is always known as ours
        record_written(tmp)
        _fsync_dir(tmp)
    if final.exists():  # a stale folder of the same step from an earlier run: move it aside, then drop it
        stale = root / f".{final.name}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_atomically(root / LATEST, final.name + "\n")


def _is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain, including inside torch.distributed.checkpoint's per-rank failures."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        failures = getattr(err, "failures", None)  # dcp's CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict) and any(_is_disk_full(pair[0]) for pair in failures.values()):
            return True
        err = err.__cause__ or err.__context__
    return False


def step_dirs(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete step folders, oldest first."""
    found = [p for p in Path(checkpoint_dir).glob("step_*")
             if p.is_dir() and not p.is_symlink() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def prune(checkpoint_dir: str | os.PathLike, keep_last_n: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep_last_n`; never the one LATEST names."""
    latest = latest_step_dir(checkpoint_dir)
    old = step_dirs(checkpoint_dir)[:-keep_last_n]
    removed = [p for p in old if latest is None or p.resolve() != latest.resolve()]
    for path in removed:
        shutil.rmtree(path)
    return removed


def latest_step_dir(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The step folder LATEST names, or None when there is no complete checkpoint."""
    marker = Path(checkpoint_dir) / LATEST
    if not marker.is_file():
        return None
    check_not_link(marker, "checkpoint")
    path = Path(checkpoint_dir) / check_step_name(marker.read_text(), marker)
    return check_not_link(path, "checkpoint") if path.is_dir() else None


def write_config(cfg: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_no_follow(path, yaml.safe_dump(cfg, sort_keys=False), "checkpoint")
