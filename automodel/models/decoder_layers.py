"""A model's decoder layers, found through its `_no_split_modules`, which every transformers architecture declares
(FSDP2 shards each layer on its own; the last layer may compute only the label rows)."""

from __future__ import annotations

from torch import nn

from automodel.errors import UserError
from automodel.models.unwrap import transformers_model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose class the model lists in `_no_split_modules`, in model order (also once FSDP2 has sharded
    them: their class is then a subclass named FSDP<name>)."""
    names = set(getattr(transformers_model(model), "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if any(c.__name__ in names for c in type(module).__mro__)]
    if not layers:
        raise UserError(f"distributed: {type(transformers_model(model)).__name__} declares no decoder layer classes "
                        "(_no_split_modules) that occur in the model, so FSDP2 cannot find its layers; "
                        "use distributed.strategy ddp")
    return layers
