"""The `distributed` and `dist_env` config sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DistributedConfig:
    """The `distributed` section: how the model is spread over the processes.

    - strategy: `auto` (default) means `fsdp2` when there is more than one process, `none` otherwise.
    - tp_size: tensor-parallel degree; the world is a `dp x tp` mesh and data parallelism runs over `dp`.
    - activation_checkpointing: recompute each decoder layer in backward (also in a single process).
    - cpu_offload: FSDP2 keeps parameters, gradients and optimizer state on the CPU (needs a GPU).
    FSDP2's mixed precision follows the top-level `precision` (config/precision.py); the older
    `mixed_precision` key is refused with a line that says so.
    """

    strategy: Literal["auto", "fsdp2", "ddp", "none"] = "auto"
    tp_size: int = 1
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    mixed_precision: str | None = None

    def __post_init__(self):
        if self.mixed_precision is not None:
            raise ValueError("replaced by the top-level `precision` (auto, fp32, bf16, bf16-mixed, bf16-frozen); "
                             "remove distributed.mixed_precision")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")


@dataclass
class DistEnvConfig:
    """The `dist_env` section: the torch.distributed process group.

    backend: `auto` picks NCCL on CUDA and gloo on CPU; any backend name torch knows overrides it.
    timeout_minutes: how long a collective may wait for a peer before the job fails.
    """

    backend: str = "auto"
    timeout_minutes: float = 30.0

    def __post_init__(self):
        if self.timeout_minutes <= 0:
            raise ValueError(f"timeout_minutes must be > 0, got {self.timeout_minutes}")
