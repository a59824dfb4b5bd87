"""Whether a step folder's training state was written by this user's own runs.

The training state in `dcp/` is read by torch.distributed.checkpoint, which unpickles its `.metadata` file and any
non-tensor values (Python's pickle runs whatever code the file names). A checkpoint from elsewhere is therefore
code, as a `trust_remote_code` model is. Each run records a fingerprint of the `dcp/` files it writes (name, size,
inode, modification time: a copied or edited file has others) in a ledger under the user's cache folder, before
publishing the step; resuming or exporting a step whose fingerprint is not there stops with one line that names
the risk and how to accept it: `checkpoint.trust_pickled_state: true` (resume) or `--trust-pickled-state`
(export). The HF-loadable `model/` folder is safetensors, read without pickle, and needs no trust.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from automodel.errors import UserError

LEDGER_ENV = "AUTOMODEL_CACHE"
LEDGER_NAME = "written_checkpoints.txt"
RISK = ("its dcp/ training state is read with Python's pickle, which can run any code the files hold (for a model "
        "only, use its safetensors model/ folder)")


def ledger_path() -> Path:
    return Path(os.environ.get(LEDGER_ENV, Path.home() / ".cache" / "automodel")) / LEDGER_NAME


def fingerprint(dcp_dir: Path) -> str:
    """Hash of each file's name, size, inode and mtime: unchanged by the publishing rename, changed by a copy."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(dcp_dir).rglob("*") if p.is_file()):
        info = path.stat()
        digest.update(f"{path.relative_to(dcp_dir)}\0{info.st_size}\0{info.st_ino}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def record_written(dcp_dir: Path) -> None:
    """Note `dcp_dir` as written by this user's run (called before the step is published)."""
    ledger = ledger_path()
    ledger.parent.mkdir(parents=True, exist_ok=True)
    line = fingerprint(dcp_dir) + "\n"
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # one short append: never interleaved
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def written_here(dcp_dir: Path) -> bool:
    ledger = ledger_path()
    if not ledger.is_file():
        return False
    return fingerprint(dcp_dir) in set(ledger.read_text().split())


def check_trusted(step_dir: Path, accepted: bool, key: str, how_to_accept: str) -> None:
    """Refuse a step folder this user's runs did not write, unless the user accepted the risk."""
    if accepted or written_here(step_dir / "dcp"):
        return
    raise UserError(f"{key}: {step_dir} was not written by your runs on this machine, and {RISK}; if you trust "
                    f"where it came from, {how_to_accept}")
