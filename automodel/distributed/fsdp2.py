"""FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder layer is its own shard group, then the root.

Decoder layers are found through the model's `_no_split_modules` (automodel/models/decoder_layers.py), so no model
needs a hand-written list.
"""

from __future__ import annotations

import torch
from torch import nn

from automodel.errors import UserError
from automodel.models.decoder_layers import decoder_layers


def mixed_precision_policy(choice: str, device: torch.device):
    """`auto`: bf16 parameters with fp32 gradient reduction where the device has bf16 (CUDA), else fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if choice == "auto":
        choice = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if choice == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp2(model: nn.Module, mesh, device: torch.device, mixed_precision: str = "auto",
                cpu_offload: bool = False) -> nn.Module:
    """Shard `model` in place over `mesh` (the data-parallel mesh); returns it for chaining."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if cpu_offload and device.type != "cuda":
        raise UserError("distributed.cpu_offload: offloading to the CPU needs a GPU run; this one is on the CPU")
    options = {"mesh": mesh, "mp_policy": mixed_precision_policy(mixed_precision, device),
               "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model
