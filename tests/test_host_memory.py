"""glibc's heap keeps freed multi-MiB buffers unless the mmap threshold is fixed (automodel/training/host_memory.py).

Each case runs in a fresh interpreter, since the setting is per process and cannot be undone: 200 buffers of 4 MiB
are freed while small tensors allocated after each stay alive, the pattern of a training step's gathered layers and
gradients. Without the setting glibc keeps them all (the resident size stays ~800 MB up); with it they go back.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import sys
from automodel.training.host_memory import return_freed_memory_promptly

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1e3

applied = return_freed_memory_promptly() if sys.argv[1] == "on" else False
first = bytearray(8 << 20)  # 8 MiB: mmapped, then freed; glibc's dynamic threshold rises above it
del first
base = rss_mb()
buffers, alive = [], []
for _ in range(200):
    buffers.append(bytearray(4 << 20))  # through malloc, as torch's CPU tensors are
    alive.append(bytearray(64))
del buffers
print(applied, round(rss_mb() - base))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")


def retained(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={**environ, **env}).stdout.split()
    return out[0], int(out[1])


def test_freed_buffers_stay_resident_without_the_setting_and_return_with_it():
    applied, kept_mb = retained("off")
    assert kept_mb > 600, kept_mb
    applied, kept_mb = retained("on")
    assert applied == "True"
    assert kept_mb < 50, kept_mb


def test_a_threshold_chosen_in_the_environment_is_left_alone():
    applied, kept_mb = retained("on", MALLOC_MMAP_THRESHOLD_="1048576")
    assert applied == "False"
    assert kept_mb < 50, kept_mb  # glibc read the user's own setting at start
