"""What the content ledger (automodel/checkpoint/provenance.py) costs next to writing and reading the state itself.

    python benchmarks/provenance_hashing.py [--gib 2] [--dir /tmp]

Writes one training-state shard of `--gib` GiB with torch.distributed.checkpoint (what a save writes), then times,
in the same run: dcp.save of it, reading it back (what any load pays at least), and hashing it as a save or a
resume does (`hash_files`, one thread and all threads). The per-GiB figures are then scaled to the ~36 GB DCP state
of a 3B full SFT (fp32 weights + two Adam moments = 12 bytes per parameter) and to a 3B LoRA step (~0.2 GB).
The file is fresh in the page cache, as it is right after a save; a resume from cold storage reads it from disk
once for the hash and again for dcp.load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from automodel.checkpoint.provenance import hash_files  # noqa: E402

FULL_SFT_3B_GB = 3.2e9 * 12 / 1e9
LORA_3B_GB = 0.2


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_all(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(16 << 20)
        while handle.readinto(buffer):
            pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="provenance_bench_", dir=args.dir))
    try:
        numel = int(args.gib * (1 << 30)) // 4
        state = {"model": {"weight": torch.randn(numel // 3)}, "optim": {"exp_avg": torch.randn(numel // 3),
                                                                        "exp_avg_sq": torch.rand(numel // 3)}}
        save_s = timed(lambda: dcp.save(state, checkpoint_id=str(root / "dcp")))
        del state
        names = sorted(str(p.relative_to(root)) for p in (root / "dcp").iterdir())
        size_gb = sum((root / n).stat().st_size for n in names) / 1e9
        shard = max((root / n for n in names), key=lambda p: p.stat().st_size)
        read_s = timed(lambda: read_all(shard))
        hash_1_s = timed(lambda: hash_files(root, names, threads=1))
        threads = min(16, os.cpu_count() or 1)
        hash_n_s = timed(lambda: hash_files(root, names, threads=threads))
    finally:
        shutil.rmtree(root)
    print(f"state: {size_gb:.2f} GB in {len(names)} files; {os.cpu_count()} CPU cores; page cache warm")
    print(f"{'operation':<32}{'seconds':>9}{'GB/s':>8}{'3B full SFT (36 GB) s':>24}{'3B LoRA (0.2 GB) s':>21}")
    for label, seconds in (("dcp.save (the save itself)", save_s), ("read once (any load)", read_s),
                           ("hash, 1 thread", hash_1_s), (f"hash, {threads} threads", hash_n_s)):
        rate = size_gb / seconds
        print(f"{label:<32}{seconds:>9.2f}{rate:>8.2f}{FULL_SFT_3B_GB / rate:>24.1f}{LORA_3B_GB / rate:>21.2f}")
    print(f"hashing adds {hash_n_s / save_s:.0%} to a save and {hash_n_s / read_s:.1f}x a warm read to a resume")


if __name__ == "__main__":
    main()
