"""QLoRA's base built on the meta device and quantised one tensor at a time as it is read.

transformers' whole-model 4-bit load (`from_pretrained(quantization_config=...)`) measured 1.83x the bf16 size of a
4-layer cut of a Llama-3.1-8B shape on the CPU (benchmarks/big_model.py). Here the model is built on the meta
device, transformers' own bitsandbytes quantizer swaps its linear layers for `bnb.nn.Linear4bit` there (the same
`preprocess_model` its load runs, so the same modules stay unquantised: the output head), and every checkpoint
tensor is then read alone and either quantised by bitsandbytes' `Params4bit` on its move to the device (what
transformers' `Bnb4bitQuantize` op does) or copied into the model's dtype a block of rows at a time. The file is
opened per read, so no more than one read's pages of the checkpoint stay mapped: the peak is the 4-bit model plus
one projection (in bf16, and bitsandbytes' temporaries while it quantises it).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from automodel.models.materialize import check_materialized, init_non_persistent_buffers, loaded_names
from automodel.models.weights import WeightFiles, check_matches_model

logger = logging.getLogger("automodel")


def quantize_on_meta(model: nn.Module, bnb_config) -> None:
    """Swap the linear layers of a meta-device model for 4-bit ones, as transformers' quantised load does."""
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    quantizer.preprocess_model(model, device_map=None, dtype=model.dtype)
    model.hf_quantizer = quantizer


BLOCK_BYTES = 64 << 20  # an unquantised tensor is read this much at a time


def read_whole(path, name: str) -> torch.Tensor:
    """One tensor, a copy of its own; the file is closed (its pages unmapped) before this returns."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as file:
        return file.get_slice(name)[:]


def read_into(target: torch.Tensor, path, name: str) -> None:
    """Fill `target` from the file a block of rows at a time, the file open for one block: an embedding's 2 GB are
    never held twice (as its mapped pages and a copy)."""
    from safetensors import safe_open

    rows = max(1, BLOCK_BYTES // max(1, target[0].numel() * target.element_size())) if target.dim() else 1
    for start in range(0, max(1, target.shape[0] if target.dim() else 1), rows):
        with safe_open(path, framework="pt") as file:
            piece = file.get_slice(name)[start:start + rows] if target.dim() else file.get_tensor(name)
        (target[start:start + rows] if target.dim() else target).copy_(piece)
        del piece


def place_tensor(model: nn.Module, name: str, path, device: torch.device, dtype: torch.dtype) -> None:
    """Put one checkpoint tensor into the model: quantised by bitsandbytes where the model holds a 4-bit
    parameter, else as a frozen tensor (floating ones in `dtype`) on `device`."""
    import bitsandbytes as bnb

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]
    if isinstance(old, bnb.nn.Params4bit):
        # transformers' Bnb4bitQuantize: a Params4bit with the meta parameter's settings, quantised by its .to()
        value = read_whole(path, name).to(dtype)
        module._parameters[leaf] = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(device)
        return
    value = torch.empty(old.shape, dtype=dtype if old.is_floating_point() else old.dtype, device=device)
    read_into(value, path, name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def load_quantized(model: nn.Module, weights: WeightFiles, device: torch.device, dtype: torch.dtype) -> None:
    """Read every tensor the model needs from the safetensors files, one at a time."""
    wanted = loaded_names(model)
    check_matches_model(weights, wanted)
    for name in wanted:
        place_tensor(model, name, weights.tensors[name].file, device, dtype)


def build_quantized_on_meta(model: nn.Module, weights: WeightFiles, bnb_config, device: torch.device) -> nn.Module:
    """The meta-device `model` (transformers' model, its config's dtype) with its 4-bit base loaded."""
    dtype = model.dtype
    quantize_on_meta(model, bnb_config)
    load_quantized(model, weights, device, dtype)
    model.tie_weights()
    for module in model.modules():  # buffers the checkpoint does not store (rotary inv_freq): computed below
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    init_non_persistent_buffers(model)
    check_materialized(model)
    model.hf_quantizer.postprocess_model(model)
    logger.info("model: QLoRA: built on the meta device; %s read and quantised one tensor at a time (%d files)",
                weights.folder, len(weights.files))
    return model
