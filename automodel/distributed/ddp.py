"""DDP (`torch.nn.parallel.DistributedDataParallel`): a full replica per rank, gradients all-reduced.

Frozen parameters (the LoRA base) take no part in the reduction: DDP only buckets parameters that require grad.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_ddp(model: nn.Module, device: torch.device, process_group=None) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=process_group)
