"""The Hugging Face `model/` folder, written without a full copy of the model in any process.

Full models go tensor by tensor: the shard plan comes from huggingface_hub (`split_state_dict_into_shards_factory`,
what transformers' `save_pretrained` uses, with the same file names and index), each sharded parameter is gathered
by all ranks (`DTensor.full_tensor`, a collective) and rank 0 appends its bytes to the shard file at once, so the
most any process holds is one full tensor. The files are safetensors written by this module rather than by
`safetensors.torch.save_file`, which takes a whole dict in memory (one shard: with transformers' default shard size
the whole model); the format is its documented header (names, dtypes, shapes, byte offsets) followed by the raw
little-endian bytes, and the header is known before any tensor is gathered.

Architectures whose weights transformers renames or fuses on load (its conversion mapping, which also holds the
conversions of the remote-code families in automodel/models/families) are written in the checkpoint's own names by
transformers' reverse conversions, one conversion group at a time (models/conversion.py): the most any process
holds is one group, e.g. one layer's fused experts. A LoRA run writes its adapter through peft's `save_pretrained`
(adapters are small). A remote-code family's folder gets its published config.json back.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from automodel.checkpoint.save import CheckpointConfig
from automodel.models import families
from automodel.models.conversion import has_conversions, realise, save_groups
from automodel.models.materialize import full_tensor
from automodel.models.weights import SAFE_DTYPES
from automodel.peft import is_peft_model


DEFAULT_MAX_SHARD_SIZE = CheckpointConfig.max_shard_size
SAFE_INDEX = "model.safetensors.index.json"


def saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a save holds: each parameter once (a tied output head is the input embedding) and the persistent
    buffers, by their transformers names."""
    tensors = dict(model.named_parameters())
    persistent = set(model.state_dict(keep_vars=True))
    tensors.update({name: b for name, b in model.named_buffers() if name in persistent})
    return tensors


def shard_plan(tensors: dict[str, torch.Tensor], max_shard_size: int | str):
    """huggingface_hub's split: file names `model-0000k-of-0000n.safetensors` (or `model.safetensors`)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    return split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda t: t.numel() * t.element_size(), max_shard_size=max_shard_size,
        filename_pattern="model{suffix}.safetensors")


def safetensors_header(names: list[str], tensors: dict[str, torch.Tensor]) -> bytes:
    """8-byte length + JSON (padded with spaces to 8 bytes, as safetensors pads it)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFE_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def saved_layout(model: nn.Module) -> tuple[dict[str, torch.Tensor], Callable[[str], torch.Tensor]]:
    """({saved name: shape-only tensor}, in writing order; a function giving a saved name's full CPU tensor).
    Names transformers converts back on save (fused MoE experts, a family's published layout) are produced one
    conversion group at a time (models/conversion.py): the group's tensors are gathered and converted when the
    first of its outputs is written, and each output is dropped once written."""
    tensors = saved_tensors(model)
    if not has_conversions(model):
        return {name: shape_only(t) for name, t in tensors.items()}, lambda name: full_tensor(tensors[name])
    planned, owner = {}, {}
    groups, renamings = save_groups(model, list(tensors), lambda name: lambda: shape_only(tensors[name]))
    for first, group in groups.items():
        for name, value in realise(first, group, model, renamings).items():
            planned[name], owner[name] = value, first
    groups, _ = save_groups(model, list(tensors), lambda name: lambda: full_tensor(tensors[name]))
    ready: dict[str, torch.Tensor] = {}

    def produce(name: str) -> torch.Tensor:
        if name not in ready:
            ready.update(realise(owner[name], groups.pop(owner[name]), model, renamings))
        return ready.pop(name)

    return planned, produce


def shape_only(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def write_full_model(model: nn.Module, folder: Path, is_main: bool, max_shard_size: int | str) -> None:
    """Every rank calls this (gathers are collectives); rank 0 writes the weights, index and config."""
    tensors, produce = saved_layout(model)
    dtype = saved_dtype(model)
    tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}  # shapes only
    plan = shard_plan(tensors, max_shard_size)
    for filename, names in plan.filename_to_tensors.items():
        handle = open(folder / filename, "wb") if is_main else None
        try:
            if handle:
                handle.write(safetensors_header(names, tensors))
            for name in names:
                value = produce(name)
                value = value.to(dtype) if value.is_floating_point() else value
                if handle:
                    handle.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del value
        finally:
            if handle:
                handle.close()
    if is_main and plan.is_sharded:
        total_parameters = sum(t.numel() for t in tensors.values())
        index = {"metadata": {"total_parameters": total_parameters, **plan.metadata},
                 "weight_map": plan.tensor_to_filename}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if is_main:
        write_model_config(model, folder)


def saved_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a full model is saved in: the checkpoint's own (its config's, which models/build.py keeps), else
    the parameters'."""
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else model.dtype


def write_model_config(model: nn.Module, folder: Path) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them."""
    model.config.dtype = str(saved_dtype(model)).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)


def gather_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable (adapter) parameters; peft's save_pretrained keeps the LoRA ones."""
    return {name: full_tensor(p) for name, p in model.named_parameters() if p.requires_grad}


def record_base_as_written(folder: Path, resolved: str, written: str) -> None:
    """An adapter names its base model as the run's config writes it (`${oc.env:VAR}` kept, not its value) in
    adapter_config.json and in peft's README.md; automodel's commands resolve it again (inference/sources.py)."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = written
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = folder / "README.md"
    if readme.is_file():
        readme.write_text(readme.read_text().replace(resolved, written))


def write_hf_model(model: nn.Module, tokenizer, folder: Path, *, is_main: bool = True,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, base_as_written: str | None = None) -> None:
    """Write what Hugging Face libraries load (`from_pretrained`) into `folder`; every rank calls this.

    `model` is the transformers or peft model (not a DDP wrapper), sharded or not. `base_as_written`: the model path
    as the config writes it, recorded in a LoRA adapter instead of the resolved one when they differ."""
    from torch.distributed.tensor import DTensor

    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if is_peft_model(model):
        state_dict = gather_adapter_state_dict(model) if sharded else None
        if is_main:
            families.save_pretrained(model, folder, state_dict=state_dict)
            resolved = model.peft_config[model.active_adapter].base_model_name_or_path
            if base_as_written and resolved and str(base_as_written) != resolved:
                record_base_as_written(folder, resolved, str(base_as_written))
    else:
        write_full_model(model, folder, is_main, max_shard_size)
        if is_main:  # a remote-code family's published config.json back (automodel/models/families)
            families.restore_published_layout(model, folder)
    if is_main:
        tokenizer.save_pretrained(folder)
