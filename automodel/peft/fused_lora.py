"""LoRA's update added inside the base layer's matmul when computing in bf16, so that it is not rounded away.

peft's LoRA Linear computes `base_layer(x) + lora_B(lora_A(x)) * scaling`. In bf16 the base layer's output is
already rounded to bf16 when the update is added, and the sum is rounded again: an update smaller than half a bf16
step of the base output (2^-9 of it) is lost every time, not just on average. A fresh adapter's update is that small
(B starts at zero and AdamW moves it by about the learning rate a step), so bf16 LoRA learned visibly slower than
fp32 LoRA, in every tool that adds the update this way (the HF Trainer's `bf16=True` too): 0.32 nats above fp32
over the last 4 of 8 steps of benchmarks/bf16_lora_gap.py. Here the update is passed to the base matmul as its addend
(`torch.addmm(update, x, W^T)`): the matmul accumulates in float32, adds the update there and rounds once, so the
update shifts the output by its own size on average; the gap closes (the table in docs/guides/llm/precision.md).

Only plain bf16/fp16 computation of a single vanilla LoRA adapter on an `nn.Linear` takes this path; fp32 runs,
DoRA and the other variants, merged or disabled adapters, quantised and tensor-parallel base layers go through
peft's own forward unchanged. The adapter's weights and their names are peft's: saved adapters are plain peft
adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

REDUCED = (torch.bfloat16, torch.float16)


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear whose bf16 forward adds the low-rank update inside the base matmul (module docstring)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not self.fuses(x):
            return super().forward(x, *args, **kwargs)
        (adapter,) = self.active_adapters
        base = self.base_layer
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        lora_input = self.lora_dropout[adapter](x)
        if not torch.is_autocast_enabled(x.device.type):  # bf16 weights without autocast: float32 adapters
            lora_input = lora_input.to(lora_a.weight.dtype)
        update = (lora_b(lora_a(lora_input)) * self.scaling[adapter]).to(x.dtype)
        flat = torch.addmm(update.reshape(-1, base.out_features), x.reshape(-1, base.in_features), base.weight.t())
        out = flat.view(*x.shape[:-1], base.out_features)
        # The bias after: folded into the addend first, the update would be rounded away against it instead.
        return out if base.bias is None else out + base.bias.to(out.dtype)

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether this forward takes the fused path: reduced-precision compute of one vanilla adapter on a plain,
        local nn.Linear."""
        reduced = x.dtype in REDUCED or torch.is_autocast_enabled(x.device.type)
        active = self.active_adapters
        return (reduced and not self.disable_adapters and not self.merged and len(active) == 1
                and active[0] in self.lora_A and active[0] not in self.lora_variant
                and type(self.base_layer) is nn.Linear and type(self.base_layer.weight.data) is torch.Tensor)


def register_fused_lora(config) -> None:
    """Make peft build FusedLoraLinear for the nn.Linear layers `config` (a LoraConfig) adapts; peft's documented
    custom-module hook. Not for a quantised base: bitsandbytes' layers subclass nn.Linear and need peft's own."""
    config._register_custom_module({nn.Linear: FusedLoraLinear})
