"""Whether a step folder's training state is, byte for byte, what this user's own runs wrote.

The training state in `dcp/` is read by torch.distributed.checkpoint, which unpickles its `.metadata` file and any
non-tensor values (Python's pickle runs whatever code the file names). A checkpoint from elsewhere is therefore
code, as a `trust_remote_code` model is. When a run publishes a step it hashes every file that resume or export
reads (`dcp/`, `rng/`, `config.yaml`, `trainer_state.json`) into the step's `provenance.json` and appends that
manifest's hash to a ledger under the user's cache folder. Resume and export then accept a step folder only when
its manifest is in the ledger, every file it lists still has that content, no other file sits in `dcp/` or `rng/`,
and none of them (nor the folder itself) is a symbolic link; otherwise one line names the file and how to accept the
risk: `checkpoint.trust_pickled_state: true` (resume) or `--trust-pickled-state` (export). Content, not inode or
modification time, is compared, since both can be put back after an edit. The HF-loadable `model/` folder is
safetensors, read without pickle, and is not hashed.

A file's hash is the SHA-256 of the SHA-256s of its 16 MiB blocks, so one large shard is hashed on all cores;
docs/security.md gives what it costs on a 3B-sized state (benchmarks/provenance_hashing.py measures it).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from automodel.errors import UserError

LEDGER_ENV = "AUTOMODEL_CACHE"
LEDGER_NAME = "written_checkpoints.txt"
MANIFEST = "provenance.json"
STATE_FOLDERS = ("dcp", "rng")  # every file in them is read: nothing else may appear there
STATE_FILES = ("config.yaml", "trainer_state.json")
BLOCK = 16 << 20
RISK = ("its dcp/ training state is read with Python's pickle, which can run any code the files hold (for a model "
        "only, use its safetensors model/ folder)")


def ledger_path() -> Path:
    return Path(os.environ.get(LEDGER_ENV, Path.home() / ".cache" / "automodel")) / LEDGER_NAME


def _block_digest(path: Path, index: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return hashlib.sha256(os.pread(fd, BLOCK, index * BLOCK)).digest()  # hashlib releases the GIL
    finally:
        os.close(fd)


def hash_files(root: Path, names: list[str], threads: int | None = None) -> dict[str, str]:
    """{name: hex digest} of the files `root/name`, their 16 MiB blocks hashed in parallel threads."""
    work = [(name, index) for name in names
            for index in range(max(1, -(-(root / name).lstat().st_size // BLOCK)))]
    threads = threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        blocks = list(pool.map(lambda item: _block_digest(root / item[0], item[1]), work))
    digests = {name: hashlib.sha256() for name in names}
    for (name, _), block in zip(work, blocks):
        digests[name].update(block)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _describe_link(path: Path, key: str) -> UserError:
    return UserError(f"{key}: {path} is a link to {os.path.realpath(path)}; a checkpoint is read from the files "
                     "your run wrote, never through links")


def state_files(step_dir: Path, key: str) -> list[str]:
    """The step-relative names of the files resume and export read, sorted; a link among them (or the folder) is
    refused."""
    if step_dir.is_symlink():
        raise _describe_link(step_dir, key)
    names = [name for name in STATE_FILES if os.path.lexists(step_dir / name)]
    for folder in STATE_FOLDERS:
        top = step_dir / folder
        if top.is_symlink():
            raise _describe_link(top, key)
        for dirpath, dirnames, filenames in os.walk(top):  # never descends into a linked folder
            for name in sorted(dirnames + filenames):
                if (Path(dirpath) / name).is_symlink():
                    raise _describe_link(Path(dirpath) / name, key)
            names += [str((Path(dirpath) / name).relative_to(step_dir)) for name in filenames]
    for name in names:
        path = step_dir / name
        if path.is_symlink():
            raise _describe_link(path, key)
        if not stat.S_ISREG(path.lstat().st_mode):
            raise UserError(f"{key}: {path} is not a regular file; a checkpoint holds only files its run wrote")
    return sorted(names)


def record_written(step_dir: Path) -> None:
    """Hash the state files of `step_dir` into its manifest and note the manifest in the ledger (called on the
    unpublished folder, before the rename that publishes the step)."""
    names = state_files(step_dir, "checkpoint")
    text = json.dumps({"sha256": hash_files(step_dir, names)}, indent=1, sort_keys=True) + "\n"
    with open(step_dir / MANIFEST, "x") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    ledger = ledger_path()
    ledger.parent.mkdir(parents=True, exist_ok=True)
    line = hashlib.sha256(text.encode()).hexdigest() + "\n"
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:  # one short append: never interleaved with another run's
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _in_ledger(manifest_bytes: bytes) -> bool:
    ledger = ledger_path()
    if ledger.is_symlink() or not ledger.is_file():
        return False
    return hashlib.sha256(manifest_bytes).hexdigest() in set(ledger.read_text().split())


def _recorded(step_dir: Path, key: str) -> dict[str, str] | None:
    """The manifest's {name: digest} when the ledger holds it, else None."""
    manifest = step_dir / MANIFEST
    if manifest.is_symlink():
        raise _describe_link(manifest, key)
    if not manifest.is_file():
        return None
    data = manifest.read_bytes()
    if not _in_ledger(data):
        return None
    return json.loads(data)["sha256"]


def check_trusted(step_dir: Path, accepted: bool, key: str, how_to_accept: str, share: tuple[int, int] = (0, 1),
                  agree: Callable[[list[int]], list[int]] | None = None) -> None:
    """Refuse a step folder that is not, file for file, what this user's runs wrote, unless the user accepted.

    With several processes each hashes its `share` (rank, count) of the files and `agree` sums the per-file
    failure flags over them, so every process refuses with the same line."""
    step_dir = Path(step_dir)
    if accepted:
        return
    trust = f"; if you trust where it came from, {how_to_accept}"
    names = state_files(step_dir, key)
    recorded = _recorded(step_dir, key)
    if recorded is None:
        raise UserError(f"{key}: {step_dir} was not written by your runs on this machine, and {RISK}{trust}")
    for name in names:
        if name not in recorded:
            raise UserError(f"{key}: {step_dir / name} was not written by the run that wrote {step_dir}, and "
                            f"{RISK}{trust}")
    for name in sorted(recorded):
        if name not in names:
            raise UserError(f"{key}: {step_dir / name} is missing: {step_dir} is not the checkpoint your run wrote")
    rank, count = share
    mine = names[rank::count]
    hashed = hash_files(step_dir, mine)
    flags = [int(name in hashed and hashed[name] != recorded[name]) for name in names]
    flags = agree(flags) if agree else flags
    changed = [name for name, flag in zip(names, flags) if flag]
    if changed:
        raise UserError(f"{key}: {step_dir / changed[0]} changed since your run wrote it (its content differs from "
                        f"the hash recorded in {MANIFEST}), and {RISK}{trust}")
