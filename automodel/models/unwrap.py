"""The wrappers around a transformers model, peeled in one place.

A training model is at most `DDP(peft(transformers model))`: DDP wraps the whole model, peft wraps the transformers
model, and FSDP2 and tensor parallelism wrap nothing (they swap the class or the parameters in place). Code that
needs the transformers model (its config, forward signature, decoder layers, output head) calls
`transformers_model`; code that needs what the optimizer and checkpoints see calls `without_ddp`.
This module imports nothing of automodel's, so every package may use it.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def without_ddp(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the peft or transformers model), or the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP and peft wrappers, in that order (DDP is outermost)."""
    model = without_ddp(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
