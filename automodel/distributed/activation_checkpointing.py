"""Activation checkpointing per decoder layer: transformers' `activation_checkpointing_enable` (non-reentrant)."""

from __future__ import annotations

from torch import nn

from automodel.errors import UserError
from automodel.models.unwrap import transformers_model


def enable_activation_checkpointing(model: nn.Module) -> None:
    base = transformers_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UserError(f"distributed.activation_checkpointing: {type(base).__name__} does not support "
                        "gradient checkpointing in transformers; set it to false")
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
