"""The run's numeric precision: one top-level setting, decided once here, followed by every part of a run.

`precision:` takes the conventional values:
- `fp32`: weights, gradients, optimizer states and compute in float32.
- `bf16-mixed`: float32 master weights and optimizer states, bf16 compute (torch.autocast; under FSDP2 its
  MixedPrecisionPolicy gathers bf16 parameters and reduces gradients in float32). Full SFT's choice.
- `bf16-frozen` (PEFT only): the frozen base stored in bf16 (half the memory of fp32, no cast per step), the
  adapters and their optimizer states in float32, bf16 compute; loss and softmax in float32. LoRA's choice.
- `bf16`: whichever of the two above fits the run (frozen with a `peft` section, mixed without).
- `auto` (the default): `bf16` where the device computes bf16 natively (a CUDA device with bf16; a CPU with
  AVX512-BF16 or AMX, asked of torch at run time), `fp32` elsewhere. It never fails.
`model.dtype` (the older way) still works alone: `float32` is `fp32`; `bfloat16` with a `peft` section is
`bf16-frozen`; otherwise `bfloat16` or `float16` store every weight, trained ones and optimizer states included, in
that dtype (`bf16-true`, `fp16-true`): the least memory, but updates smaller than a weight's last bit are lost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from automodel.errors import UserError

CHOICES = ("auto", "fp32", "bf16", "bf16-mixed", "bf16-frozen")
LEGACY_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Precision:
    """What the run stores and computes in. `weights_dtype`: the model's weights as built and loaded (the frozen
    base's under bf16-frozen); `trainable_dtype`: trained parameters and optimizer states; `compute_dtype`: matmuls."""

    name: str
    reason: str
    weights_dtype: torch.dtype = torch.float32
    trainable_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32

    @property
    def mixed(self) -> bool:
        """Compute in a lower dtype than the trained weights (autocast, FSDP2's param_dtype)."""
        return self.compute_dtype != self.trainable_dtype

    def forward_context(self, device: torch.device) -> Callable[[], AbstractContextManager]:
        """What makes the context each forward pass runs in on `device`: autocast to the compute dtype when mixed,
        else nothing. Chosen once for the run (distributed/parallel.py `Parallelism.forward_context`), called per
        forward."""
        if not self.mixed:
            return nullcontext
        return functools.partial(torch.autocast, device.type, dtype=self.compute_dtype)

    def describe(self) -> str:
        """The banner's `precision` row."""
        names = {dtype: DTYPE_NAMES[dtype] for dtype in (self.weights_dtype, self.trainable_dtype, self.compute_dtype)}
        if self.name == "bf16-frozen":
            held = (f"frozen weights {names[self.weights_dtype]}, trained weights and optimizer "
                    f"{names[self.trainable_dtype]}")
        elif self.name == "bf16-mixed":
            held = f"weights and optimizer {names[self.trainable_dtype]}"
        else:
            held = f"weights and optimizer {names[self.weights_dtype]}"
        return f"{self.name}: {held}, compute {names[self.compute_dtype]} ({self.reason})"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, what it has or lacks), as torch reports it."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"CUDA device {torch.cuda.get_device_name(device)} has bf16"
        return False, f"CUDA device {torch.cuda.get_device_name(device)} has no native bf16 (compute capability < 8)"
    if device.type == "cpu":
        features = [name for name, present in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                               ("AMX", torch.cpu._is_amx_tile_supported())) if present]
        if features:
            return True, f"this CPU computes bf16 natively ({' and '.join(features)})"
        return False, "this CPU has neither AVX512-BF16 nor AMX"
    return False, f"device {device.type} is not checked for bf16"


def resolve_precision(cfg: dict[str, Any], device: torch.device, peft: bool) -> Precision:
    """The run's precision from `precision` (and the older `model.dtype`) for `device`; one line on bad input."""
    choice = cfg.get("precision", "auto")
    legacy = (cfg.get("model") or {}).get("dtype")
    if choice not in CHOICES:
        raise UserError(f"precision: expected one of {', '.join(CHOICES)}, got {choice!r}")
    if legacy is not None:
        return _from_model_dtype(legacy, choice, peft)
    if choice == "fp32":
        return Precision("fp32", "set in the config")
    if choice == "bf16-frozen" and not peft:  # a config error on any machine, named before the hardware's
        raise UserError("precision: bf16-frozen keeps a frozen base in bf16 and needs a `peft` section; full SFT "
                        "trains every weight: use bf16-mixed (or bf16)")
    has_bf16, why = native_bf16(device)
    if choice == "auto":
        if not has_bf16:
            return Precision("fp32", f"auto: {why}")
        choice, reason = "bf16", f"auto: {why}"
    else:
        if not has_bf16:
            raise UserError(f"precision: {choice} needs native bf16, and {why}; use precision: auto or fp32")
        reason = "set in the config"
    if choice == "bf16":
        choice = "bf16-frozen" if peft else "bf16-mixed"
    if choice == "bf16-frozen":
        return Precision("bf16-frozen", reason, weights_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    return Precision("bf16-mixed", reason, compute_dtype=torch.bfloat16)


def _from_model_dtype(value: Any, choice: str, peft: bool) -> Precision:
    if value not in LEGACY_DTYPES:
        raise UserError(f"model.dtype: expected one of {', '.join(LEGACY_DTYPES)}, got {value!r}")
    dtype = LEGACY_DTYPES[value]
    if dtype == torch.float32:
        if choice not in ("auto", "fp32"):
            raise UserError(f"model.dtype: {value} contradicts precision: {choice}; remove model.dtype (precision "
                            "decides the dtypes)")
        return Precision("fp32", "model.dtype: float32")
    if choice != "auto":
        raise UserError(f"model.dtype: {value} stores every weight in {DTYPE_NAMES[dtype]}, which contradicts "
                        f"precision: {choice}; remove model.dtype (precision decides the dtypes)")
    if peft and dtype == torch.bfloat16:  # peft keeps the adapters of a bf16 base in float32: bf16-frozen
        return Precision("bf16-frozen", f"model.dtype: {value}", weights_dtype=dtype, compute_dtype=dtype)
    name = "bf16-true" if dtype == torch.bfloat16 else "fp16-true"
    return Precision(name, f"model.dtype: {value}", weights_dtype=dtype, trainable_dtype=dtype, compute_dtype=dtype)
