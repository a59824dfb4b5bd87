"""A loaded transformers model -> one GGUF file (weights, tokenizer, chat template), tensor by tensor.

The `gguf` package's GGUFWriter is used in its streaming mode: every tensor's GGUF name, shape and type is planned
first from the model's parameters (no data touched), the header, metadata and tensor table are written, then each
tensor is converted (llama.cpp's per-architecture change, cast, quantisation) and appended at once, so the most the
export holds besides the model is one tensor in float32 and its encoded bytes. Which tensors are quantised follows
llama.cpp's `prepare_tensors`: 1-D tensors, norms, biases, MoE routers and position embeddings stay F32; a tensor
whose rows are not whole Q8_0 blocks is written F16, as llama.cpp's converter does. The file is written under a
temporary name beside the output and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from automodel.checkpoint.hf_writer import saved_tensors
from automodel.errors import UserError
from automodel.gguf_out import architectures, families
from automodel.gguf_out.vocab import add_tokenizer

logger = logging.getLogger("automodel")

# the types written here directly; llama.cpp's quantizer makes the others from an F32 or BF16 file (llamacpp.py)
DIRECT_TYPES = ("F32", "F16", "BF16", "Q8_0")


@dataclass
class PlannedTensor:
    name: str  # the GGUF tensor name
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    produce: Callable[[], torch.Tensor]  # the tensor to write, float32, after llama.cpp's change


def file_type(type_name: str):
    """The gguf.LlamaFileType of a direct type name."""
    import gguf

    return gguf.LlamaFileType.ALL_F32 if type_name == "F32" else gguf.LlamaFileType[f"MOSTLY_{type_name}"]


def always_f32(gguf_name: str) -> bool:
    """llama.cpp's prepare_tensors keeps these in F32 whatever the file type (as its quantizer does): MoE routers,
    position and token-type embeddings, Mamba's conv1d (llama.cpp's ssm_conv takes F32 weights only)."""
    import gguf

    kinds = gguf.MODEL_TENSOR
    base = re.sub(r"^blk\.\d+\.", "blk.{bid}.", gguf_name.removesuffix(".weight"))
    return base in {gguf.TENSOR_NAMES[kind] for kind in (kinds.FFN_GATE_INP, kinds.FFN_GATE_INP_SHEXP,
                                                          kinds.POS_EMBD, kinds.TOKEN_TYPES,
                                                          kinds.SSM_CONV1D)}


def tensor_type(gguf_name: str, shape: tuple[int, ...], type_name: str):
    """llama.cpp's prepare_tensors: which GGML type a tensor gets in a file of `type_name`."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    if (len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
            or always_f32(gguf_name)):
        return kinds.F32
    qtype = kinds[type_name]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:  # llama.cpp's converter falls back to F16 on the same QuantError
        logger.warning("GGUF: %s %s has rows that are not whole %s blocks: written F16", gguf_name, shape, type_name)
        return kinds.F16
    return qtype


def encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    """The tensor's bytes in GGML type `qtype` (`gguf.quants` for Q8_0, torch casts for the float types)."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    tensor = tensor.detach().to(torch.float32).contiguous()
    if qtype == kinds.F32:
        return tensor.numpy()
    if qtype == kinds.F16:
        return tensor.to(torch.float16).numpy()
    if qtype == kinds.BF16:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(tensor.numpy(), qtype)


def plan_tensors(model: nn.Module, rules, config: dict, type_name: str) -> list[PlannedTensor]:
    """Every tensor of the model (each parameter once: a tied output head is llama.cpp's token embedding, a fused
    tensor llama.cpp keeps apart as its pieces) with its GGUF name from the gguf package's TensorNameMap; an
    unmapped name stops the export."""
    import gguf

    arch = gguf.MODEL_ARCH[rules.arch]
    name_map = gguf.get_tensor_name_map(arch, architectures.block_count(config))
    planned = [PlannedTensor(name, tuple(t.shape), gguf.GGMLQuantizationType.F32, lambda t=t: t)
               for name, t in architectures.extra_tensors(rules, config).items()]
    for hf_name, tensor in saved_tensors(model).items():
        if hf_name in rules.skipped:
            continue
        shape = tuple(tensor.shape)
        pieces = (rules.split and rules.split(hf_name, shape, config)) or [(hf_name, shape, lambda t: t)]
        for piece_name, piece_shape, take in pieces:
            gguf_name = name_map.get_name(piece_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"--format gguf: {config.get('architectures', ['?'])[0]} tensor {hf_name} has no "
                                f"name in llama.cpp's {rules.arch.lower()} tensor map")

            def produce(piece_name=piece_name, tensor=tensor, take=take) -> torch.Tensor:
                return rules.tensor(piece_name, take(tensor.detach()).to(torch.float32), config)

            planned.append(PlannedTensor(gguf_name, piece_shape, tensor_type(gguf_name, piece_shape, type_name),
                                         produce))
    names = {tensor.name: tensor for tensor in planned}
    if rules.needs_output and "output.weight" not in names:  # a tied head, which this llama.cpp graph cannot share
        embedding = names["token_embd.weight"]
        planned.append(PlannedTensor("output.weight", embedding.shape, tensor_type("output.weight", embedding.shape,
                                                                                   type_name), embedding.produce))
    return planned


def nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block_size * type_size


def add_metadata(writer, model: nn.Module, tokenizer, rules, config: dict, type_name: str, name: str) -> None:
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(file_type(type_name))
    writer.add_quantization_version(2)  # gguf.GGML_QUANT_VERSION, what llama.cpp's converter writes
    rules.parameters(writer, config)
    architectures.linear_rope_parameters(writer, config)
    add_tokenizer(writer, tokenizer, config["vocab_size"])


def write_gguf(model: nn.Module, tokenizer, output: Path, type_name: str, name: str) -> Path:
    """Write `model` + `tokenizer` as one GGUF file of type `type_name` (one of DIRECT_TYPES) at `output`."""
    import gguf

    config = model.config.to_dict()
    families.check_loaded(model)
    rules = families.with_norm_head(architectures.rules_for(families.named_config(model, config),
                                                            type(model).__name__), config)
    if rules.model_check is not None and (lacking := rules.model_check(model)) is not None:
        raise UserError(f"--format gguf: {type(model).__name__} with {lacking} has no GGUF export")
    planned = plan_tensors(model, rules, config, type_name)
    partial = output.with_name(f".{output.name}.partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[rules.arch]])
    try:
        add_metadata(writer, model, tokenizer, rules, config, type_name, name)
        for tensor in planned:
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), nbytes(tensor.shape, tensor.qtype),
                                   raw_dtype=tensor.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for tensor in planned:
                writer.write_tensor_data(encode(tensor.produce(), tensor.qtype))
        writer.close()
        os.replace(partial, output)  # the file appears complete or not at all
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    logger.info("GGUF %s (%s, llama.cpp architecture %s, %d tensors, rules of convert_hf_to_gguf's %s) written to %s",
                name, type_name, rules.arch.lower(), len(planned), rules.follows, output)
    return output
