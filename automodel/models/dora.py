"""DoRA's magnitude vectors for a model built on the meta device (models/build.py).

peft computes each adapted layer's magnitude (`lora_magnitude_vector`) from the base weight when it wraps the
layer: the row norms of W + scaling * (B @ A). On the meta device it gets meta tensors back, so once the base
weights are read (each process its shard) every magnitude is computed again with peft's own code, one layer at a
time: the layer's base weight is gathered whole only while its norms are taken, then each process keeps its shard
of the result. The whole-model load computes them on the CPU before the model moves to its device; so do we, which
gives the same numbers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from automodel.models.materialize import fill_from_full, full_tensor

logger = logging.getLogger("automodel")


class _BaseWeight(nn.Module):
    """What peft's DoRA update reads of a base layer: its weight (here the gathered one, frozen as the base is)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


def dora_magnitudes(model: nn.Module, lora_values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{parameter name: full magnitude vector} of every DoRA layer, from its loaded base weight and the adapter's
    initial A and B (`lora_values`, models/materialize.py's `lora_initial_values`). Every process calls it and
    visits the layers in the same order, so the gathers line up."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.dora import DoraLinearLayer

    magnitudes = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or not layer.lora_magnitude_vector:
            continue
        if not isinstance(layer, LoraLinear):  # peft's embedding and conv DoRA: LoraSettings adapts linear layers
            raise RuntimeError(f"DoRA on the meta device covers linear layers; {name} is a {type(layer).__name__}")
        base = _BaseWeight(full_tensor(layer.get_base_layer().weight))
        for adapter, magnitude in layer.lora_magnitude_vector.items():
            # peft took the norms while A and B had the base layer's dtype (get_peft_model casts the adapters of a
            # bf16 or fp16 base to fp32 only after wrapping every layer); the magnitude's copy casts it as that did
            lora_a, lora_b = (lora_values[f"{name}.{part}.{adapter}.weight"].to(base.weight.dtype)
                              for part in ("lora_A", "lora_B"))
            fresh = DoraLinearLayer(fan_in_fan_out=magnitude.fan_in_fan_out)
            fresh.update_layer(base_layer=base, lora_A=lora_a, lora_B=lora_b, scaling=layer.scaling[adapter])
            magnitudes[f"{name}.lora_magnitude_vector.{adapter}.weight"] = fresh.weight.detach()
    return magnitudes


def fill_dora_magnitudes(model: nn.Module, lora_values: dict[str, torch.Tensor]) -> None:
    """Compute every DoRA magnitude (after the base weights are loaded) into its parameter, each process keeping
    its shard. The vectors are small (one value per output feature); the gathered base weight is one layer's."""
    magnitudes = dora_magnitudes(model, lora_values)
    left = [name for name, _ in model.named_parameters() if ".lora_magnitude_vector." in name
            and name not in magnitudes]
    if left:
        raise RuntimeError(f"DoRA magnitudes not computed on the meta-device build: {left[:3]}")
    fill_from_full(model, magnitudes)
    logger.info("model: DoRA magnitudes of %d adapted layers computed from the loaded weights, one layer at a time",
                len(magnitudes))
