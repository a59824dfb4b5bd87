"""bf16 LoRA keeps its update: automodel/peft/fused_lora.py adds it inside the base matmul, rounded once.

peft's own forward rounds the base output to bf16 and then adds the update: an update below half a bf16 step of
the output is lost, deterministically. On the real stories260K model with a small update (about a tenth of a bf16
step, what a fresh adapter's first steps give) the test measures, in the update's direction, how much of it reached
the output: all of it on average for the fused path, almost none for peft's.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from automodel.models.loader import load_causal_lm
from automodel.peft import LoraSettings
from automodel.peft.fused_lora import FusedLoraLinear
from tests.conftest import STORIES


def adapted_q_proj(dtype: torch.dtype):
    model = LoraSettings(target_modules=["q_proj"], dim=4).apply(load_causal_lm(str(STORIES), dtype=dtype))
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter's B is not zero
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=generator))
    return layer, torch.randn(512, layer.in_features, generator=generator)


def share_reached(out: torch.Tensor, base: torch.Tensor, update: torch.Tensor) -> float:
    """The mean of (output - exact base product), along the update's sign, over the update's mean size."""
    return float(((out.double() - base) * update.sign()).mean() / update.abs().mean())


def test_bf16_update_below_the_rounding_step_reaches_the_output():
    layer, x = adapted_q_proj(torch.bfloat16)
    assert isinstance(layer, FusedLoraLinear)
    x = x.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # how bf16-frozen runs every forward
        unit = layer.lora_B["default"](layer.lora_A["default"](x)).double() * layer.scaling["default"]
        layer.scaling["default"] *= 0.1 * 2 ** -8 / float(unit.abs().mean())  # a tenth of a bf16 step (outputs ~1)
        update = layer.lora_B["default"](layer.lora_A["default"](x)).double() * layer.scaling["default"]
        assert layer.fuses(x)
        fused = layer(x)
        plain = PeftLoraLinear.forward(layer, x)
    base = x.double() @ layer.base_layer.weight.double().T  # bf16 operands, exact products and sums
    assert base.abs().mean() > 0.3, "outputs of order 1, so the update is below half a rounding step"
    assert fused.dtype == plain.dtype == torch.bfloat16
    assert abs(share_reached(fused, base, update) - 1) < 0.15
    assert share_reached(plain, base, update) < 0.5, "peft's forward loses most of it (why the fused path exists)"


def test_fp32_forward_is_peft_own():
    layer, x = adapted_q_proj(torch.float32)
    with torch.no_grad():
        assert not layer.fuses(x)
        assert torch.equal(layer(x), PeftLoraLinear.forward(layer, x))
