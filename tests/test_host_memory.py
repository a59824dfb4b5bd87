"""glibc's heap keeps freed multi-MiB buffers unless the mmap threshold is fixed (automodel/training/host_memory.py).

Each case runs in a fresh interpreter, since the setting is per process and cannot be undone: 200 buffers of 4 MiB
are freed while small tensors allocated after each stay alive, the pattern of a training step's gathered layers and
gradients. Without the setting glibc keeps them all (the resident size stays ~800 MB up); with it they go back.
During the training steps the threshold is 32 MiB, so a step reuses its buffers without page faults, and
malloc_trim hands what the heap holds back (when the steps start and after a save).
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
    alive.append(bytearray(1024))  # over pymalloc's 512 bytes: from malloc's heap, between the buffers
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


PHASES = """
import resource, sys
from automodel.training import host_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1e3

def faults_per_buffer(count=20):
    \"\"\"Minor page faults of allocating, touching and freeing a 4 MiB buffer (an activation), per buffer.\"\"\"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        buffer = bytearray(4 << 20)  # zeroed, so every page is touched
        del buffer
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / count

applied = host_memory.return_freed_memory_promptly()
load_faults = faults_per_buffer()
entered = host_memory.training_steps()
faults_per_buffer(2)  # the heap grows to hold one buffer
step_faults = faults_per_buffer()
base = rss_mb()
buffers, alive = [], []
for _ in range(200):
    buffers.append(bytearray(4 << 20))
    alive.append(bytearray(1024))  # over pymalloc's 512 bytes: from malloc's heap, between the buffers
del buffers
kept = rss_mb() - base
trimmed = host_memory.trim()
print(applied, entered, trimmed, round(load_faults), round(step_faults), round(kept), round(rss_mb() - base))
"""


def phases(**env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    return subprocess.run([sys.executable, "-c", PHASES], capture_output=True, text=True, check=True,
                          env={**environ, **env}).stdout.split()


def test_training_steps_reuse_their_buffers_and_trim_gives_the_heap_back():
    applied, entered, trimmed, load_faults, step_faults, kept_mb, after_trim_mb = phases()
    assert (applied, entered, trimmed) == ("True", "True", "True")
    # Load and save: every 4 MiB buffer is a fresh mapping, 1024 pages faulted in; steps: the heap's, reused.
    assert int(load_faults) >= 1000 and int(step_faults) < 10, (load_faults, step_faults)
    assert int(kept_mb) > 600 and int(after_trim_mb) < 50, (kept_mb, after_trim_mb)


def test_the_phases_leave_a_threshold_chosen_in_the_environment_alone():
    applied, entered, trimmed, load_faults, step_faults, kept_mb, after_trim_mb = phases(
        MALLOC_MMAP_THRESHOLD_="1048576")
    assert (applied, entered, trimmed) == ("False", "False", "False")
    assert int(step_faults) >= 1000 and int(kept_mb) < 50  # the user's 1 MiB holds throughout


def test_a_training_run_switches_the_phases(tmp_path):
    """The CLI's run: 1 MiB while it loads, 32 MiB and a trimmed heap for the steps, 1 MiB around the save."""
    import yaml

    from tests.helpers import tiny_squad_config

    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=2, train_samples=8)
    cfg["validation_dataset"]["limit_dataset_samples"] = 4
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    environ = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    run = subprocess.run([sys.executable, "-m", "automodel", "finetune", "llm", "-c", str(tmp_path / "cfg.yaml"),
                          "--log-level", "DEBUG"], capture_output=True, text=True, env=environ, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    log = run.stdout + run.stderr
    steps, save = log.find("host memory: training steps: heap trimmed, mmap threshold 32 MiB"), \
        log.find("host memory: checkpoint save: mmap threshold 1 MiB")
    assert 0 <= steps < save, log[-3000:]
