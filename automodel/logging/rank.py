"""Which process speaks: only rank 0 prints, draws progress bars and writes metrics."""

from __future__ import annotations

import torch.distributed as dist


def is_main_process() -> bool:
    """True outside torch.distributed and on its rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
