"""Freed host memory goes back to the system at once, so a training process's resident size is what it holds.

glibc's malloc hands a freed block over its mmap threshold back to the kernel immediately and keeps smaller ones in
its heap for reuse. The threshold starts at 128 KiB and rises to the size of each large block freed (up to 32 MiB),
so after the first steps every freed buffer of a few MiB (a gathered FSDP2 layer, a gradient before its
reduce-scatter, a loaded checkpoint slice) stays in the heap. Those buffers are not reused in the order they were
freed, so the heap only grows: with a 1B model the resident size peaked a gigabyte over what the process held
(docs/guides/llm/distributed.md, "How big a model fits"). A fixed threshold of 1 MiB stops it rising; blocks under
it (the activations of small models) are served as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger("automodel")

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
THRESHOLD_BYTES = 1 << 20


def return_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; False where the C library is not glibc or the user
    already chose a threshold (MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES in the environment)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        logger.debug("host memory: the environment sets malloc's mmap threshold; left as it is")
        return False
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):
        logger.debug("host memory: the C library is not glibc; its allocator is left as it is")
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
