"""QLoRA: the frozen base model loaded in 4 bits through bitsandbytes, LoRA adapters trained on top.

The base is built on the meta device and quantised tensor by tensor (automodel/models/quantized.py), or loaded
whole by transformers (`BitsAndBytesConfig`). Preparing it for training does what peft's
`prepare_model_for_kbit_training` does without activation checkpointing (freeze the base, its unquantised fp16
parameters in fp32), except that a bf16 base stays in bf16, as the frozen base of bf16 LoRA does: peft would
upcast the embedding and output head too, 4.2 GB instead of 2.1 GB at a Llama-3.1-8B shape, more than the 4-bit
layers save over the 0.45x target of benchmarks/big_model.py's qlora8b (bf16 has fp32's range; fp16's overflow
is what the upcast is for).

Only the adapter is trained and saved; it is an ordinary LoRA adapter for the unquantised base (its
`base_model_name_or_path`), so `generate`, `merge-lora` and `serve` use it like any other.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

from automodel.config.instantiate import parse_section
from automodel.errors import UserError

QUANTIZABLE_DEVICES = ("cuda", "cpu")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QuantizationSettings:
    """`peft.quantization`: how the base model is stored while the adapter trains."""

    bits: Literal[4] = 4
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    @classmethod
    def from_config(cls, node, key: str) -> "QuantizationSettings":
        return parse_section(cls, node, key)

    def bnb_config(self):
        """The transformers `BitsAndBytesConfig` that loads the base in 4 bits."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=COMPUTE_DTYPES[self.compute_dtype])

    def check_device(self, device: torch.device, world_size: int = 1) -> None:
        """One line when this machine or layout cannot run the 4-bit base."""
        if world_size > 1:
            raise UserError(f"peft.quantization: QLoRA runs in one process here ({world_size} were started): "
                            "FSDP2 cannot shard bitsandbytes' packed 4-bit weights; start one process")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("peft.quantization: needs the bitsandbytes package: `pip install bitsandbytes` "
                            "(or `pip install automodel[qlora]`)")
        if device.type not in QUANTIZABLE_DEVICES:
            raise UserError(f"peft.quantization: bitsandbytes' 4-bit layers run on {' and '.join(QUANTIZABLE_DEVICES)}, "
                            f"this run is on {device.type}; remove peft.quantization to train LoRA on the "
                            "full-precision base")

    def prepare_for_training(self, model):
        import bitsandbytes as bnb

        for param in model.parameters():
            param.requires_grad = False
            if param.dtype == torch.float16 and not isinstance(param, bnb.nn.Params4bit):
                param.data = param.data.float()
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # On a CPU with AVX512-BF16, a forward in eval mode without gradients (validation) repacks the
                # weights, in place, into an inference-only layout; training on them afterwards gives the LoRA
                # weights no gradients (bitsandbytes 0.50.2). Keep the layout that trains.
                module.support_avx512bf16_for_cpu = False
        return model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
