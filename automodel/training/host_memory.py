"""Freed host memory goes back to the system when it matters, without a page-fault tax on every training step.

glibc's malloc hands a freed block over its mmap threshold back to the kernel immediately and keeps smaller ones in
its heap for reuse. The threshold starts at 128 KiB and rises to the size of each large block freed (up to 32 MiB),
so after the first steps every freed buffer of a few MiB (a gathered FSDP2 layer, a gradient before its
reduce-scatter, a loaded checkpoint slice) stays in the heap. Those buffers are not reused in the order they were
freed, so the heap only grows: with a 1B model the resident size peaked a gigabyte over what the process held
(docs/guides/llm/distributed.md, "How big a model fits").

A threshold fixed at 1 MiB for the whole run stops that, but sends every activation buffer over 1 MiB through
mmap, munmap and fresh page faults, step after step: ~40% of the tokens/s of the SmolLM2 LoRA cell
(docs/guides/llm/performance.md). So the threshold is set per phase:
- model load and checkpoint save (`return_freed_memory_promptly`, `saving`): 1 MiB, every freed buffer returns;
- training steps (`training_steps`): 32 MiB (glibc's own ceiling; the heap's top is kept up to twice that), so a
  step reuses its buffers from the heap; `malloc_trim(0)` when the steps start and after each save hands back what
  setup or the save left in the heap. Not after every step: the next step faults the pages in again (measured:
  more page faults per step than the fixed 1 MiB; docs/guides/llm/performance.md, "Host memory").
Nothing is changed where the C library is not glibc or the user chose a threshold (MALLOC_MMAP_THRESHOLD_ or
GLIBC_TUNABLES in the environment).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from contextlib import contextmanager
from functools import lru_cache

logger = logging.getLogger("automodel")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers in glibc's malloc.h
THRESHOLD_BYTES = 1 << 20  # load and save
TRIM_BYTES = 128 << 10  # glibc's default: free memory over it at the heap's top goes back at once
TRAINING_THRESHOLD_BYTES = 32 << 20  # training steps: DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
# Twice the mmap threshold, as glibc's own dynamic setting keeps it: a buffer freed at the heap's top stays for
# the next one instead of being handed back and faulted in again (malloc_trim after the step hands it back).
TRAINING_TRIM_BYTES = 2 * TRAINING_THRESHOLD_BYTES

_managed = False  # whether this process set the threshold (and so may move it between phases)


@lru_cache(maxsize=1)
def _glibc():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None


def _user_chose_threshold() -> bool:
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")


def return_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process (the setting for model load and save); False where the
    C library is not glibc or the user already chose a threshold."""
    global _managed
    if _user_chose_threshold():
        logger.debug("host memory: the environment sets malloc's mmap threshold; left as it is")
        return False
    if _glibc() is None:
        logger.debug("host memory: the C library is not glibc; its allocator is left as it is")
        return False
    _managed = bool(_glibc().mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    return _managed


def trim() -> bool:
    """Hand the heap's free pages back to the system (glibc's malloc_trim(0)); True when this process manages
    its threshold and the call ran."""
    if not _managed:
        return False
    _glibc().malloc_trim(0)
    return True


def training_steps() -> bool:
    """Enter the training steps: what setup freed goes back, and steps reuse their buffers from the heap."""
    if not _managed:
        return False
    trim()
    logger.debug("host memory: training steps: heap trimmed, mmap threshold %d MiB", TRAINING_THRESHOLD_BYTES >> 20)
    return bool(_glibc().mallopt(M_MMAP_THRESHOLD, TRAINING_THRESHOLD_BYTES)) and \
        bool(_glibc().mallopt(M_TRIM_THRESHOLD, TRAINING_TRIM_BYTES))


@contextmanager
def saving():
    """Around a checkpoint save: freed buffers return at once; then back to the training steps' setting."""
    if _managed:
        logger.debug("host memory: checkpoint save: mmap threshold %d MiB", THRESHOLD_BYTES >> 20)
        _glibc().mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)
        _glibc().mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)
    try:
        yield
    finally:
        training_steps()
