"""Filling a model that was built on the meta device: checkpoint weights, LoRA's initial values, buffers.

Each process allocates only what it holds (`to_empty` after TP / FSDP2 have split the parameters) and reads only
its slices: `torch.distributed.checkpoint.load` with its `HuggingFaceStorageReader` maps each rank's shard of
every parameter to the matching slice of the safetensors files (read through safetensors' mmap), and copies it
into the parameter, casting bf16/fp16 storage to the training dtype on the way. No process ever holds a full copy.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

PEFT_PREFIX = "base_model.model."


def checkpoint_name(name: str, peft: bool) -> str:
    """The safetensors name of a model state-dict entry: peft's wrapper adds a prefix and `.base_layer` (twice for a
    module with two adapted parameters, such as fused experts' gate_up_proj and down_proj)."""
    return re.sub(r"(\.base_layer)+\.", ".", name.removeprefix(PEFT_PREFIX)) if peft else name


def loaded_names(model: nn.Module) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{name: (shape, floating)} of what the checkpoint must provide: every parameter once (a tied output head is
    the input embedding's parameter) and the persistent buffers."""
    wanted = {name: (tuple(p.shape), p.is_floating_point()) for name, p in model.named_parameters()}
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        if name in persistent:
            wanted[name] = (tuple(buffer.shape), buffer.is_floating_point())
    return wanted


@contextmanager
def module_registrations():
    """The modules attached to a parent while the block runs, in the order they were attached (torch's global
    registration hook, removed on exit). Around peft's `get_peft_model` it gives the order in which peft made each
    layer's adapters, hence the order of its random draws: peft releases differ (0.21 made the module targets'
    adapters in the model's order, then the fused-parameter targets' (ParamWrapper); 0.22 makes the parameter
    targets' first), and each draws its own way."""
    attached: list[nn.Module] = []

    def record(parent: nn.Module, name: str, child: nn.Module | None) -> None:
        if child is not None:
            attached.append(child)

    handle = register_module_module_registration_hook(record)
    try:
        yield attached
    finally:
        handle.remove()


def lora_initial_values(model: nn.Module, rng_before: torch.Tensor,
                        attached: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The values peft gave the adapters when it applied them to the meta model (peft moved them to the meta
    device, so they are recomputed): the same draws from the same generator state, in the order peft made the
    adapters (`attached`: what `module_registrations` saw while peft ran), each as peft's `update_layer` draws it
    (lora_A's and lora_B's nn.Linear init, then `reset_lora_parameters` with the adapter's `init_lora_weights`),
    rounded through the base layer's dtype as peft's move to it does. Full-size CPU tensors (rank x features:
    small)."""
    rng_after = torch.get_rng_state()
    torch.set_rng_state(rng_before)
    values = {}
    for name, layer, adapter in adapters_in_creation_order(model, attached):
        # peft's ParamWrapper (LoRA on a fused expert parameter) names its base tensor; other layers wrap a weight
        base = layer.get_param() if hasattr(layer, "get_param") else layer.get_base_layer().weight
        base_dtype = base.dtype
        parts = {"lora_A": layer.lora_A[adapter], "lora_B": layer.lora_B[adapter]}
        dtypes = {part: module.weight.dtype for part, module in parts.items()}
        for module in parts.values():
            module.to_empty(device="cpu").float().reset_parameters()
        init = model.peft_config[adapter].init_lora_weights
        if init == "orthogonal":  # peft's update_layer dispatch, for the inits LoraSettings allows
            layer.orthogonal_init(adapter)
        elif init:
            layer.reset_lora_parameters(adapter, init)
        for part, module in parts.items():
            for pname, param in module.named_parameters():
                values[f"{name}.{part}.{adapter}.{pname}"] = param.detach().to(base_dtype).to(dtypes[part])
            module.to(device="meta", dtype=dtypes[part])
    if not torch.equal(torch.get_rng_state(), rng_after):
        raise RuntimeError("LoRA initial values could not be reproduced on the meta device (peft drew a different "
                           "sequence of random numbers); this peft version or adapter type is not supported here")
    return values


def adapters_in_creation_order(model: nn.Module, attached: list[nn.Module]) -> list[tuple[str, nn.Module, str]]:
    """(layer name, LoRA layer, adapter name) of every adapter, in the order peft attached its lora_A module (peft
    makes lora_A, lora_B and their initial values of one adapter before it moves on to the next)."""
    from peft.tuners.lora import LoraLayer

    first_seen: dict[int, int] = {}
    for position, module in enumerate(attached):
        first_seen.setdefault(id(module), position)
    adapters = [(name, layer, adapter) for name, layer in model.named_modules() if isinstance(layer, LoraLayer)
                for adapter in layer.lora_A]
    unseen = [f"{name}.lora_A.{adapter}" for name, layer, adapter in adapters
              if id(layer.lora_A[adapter]) not in first_seen]
    if unseen:
        raise RuntimeError(f"LoRA adapters made outside the recorded peft call: {unseen[:3]}")
    return sorted(adapters, key=lambda entry: first_seen[id(entry[1].lora_A[entry[2]])])


def checkpoint_targets(model: nn.Module, wanted: set[str], peft: bool) -> dict[str, torch.Tensor]:
    """{checkpoint name: this process's tensor (a DTensor when sharded)} for every tensor the checkpoint fills."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    targets = {}
    for name, tensor in get_model_state_dict(model).items():
        key = checkpoint_name(name, peft)
        if key in wanted and key not in targets:
            targets[key] = tensor
    missing = wanted - set(targets)
    if missing:
        raise RuntimeError(f"model parameters not found after wrapping: {sorted(missing)[:3]}")
    return targets


def load_checkpoint_weights(model: nn.Module, folder, wanted: set[str], peft: bool) -> None:
    """Every process reads its own slices of the checkpoint's tensors into its (possibly sharded) parameters."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    targets = checkpoint_targets(model, wanted, peft)
    dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not dist.is_initialized())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; for a DTensor (FSDP2, TP) a gather that every process joins."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


@torch.no_grad()
def copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into `target`, which keeps only its own shard of it when it is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        shard = distribute_tensor(full.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(full)


def fill_from_full(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the parameters of those names, each process keeping its own shard of them."""
    params = dict(model.named_parameters())
    for name, full in values.items():
        copy_into(params[name], full)


def init_non_persistent_buffers(base_model: nn.Module) -> None:
    """Buffers a checkpoint does not store (rotary `inv_freq`, embedding scales) computed as transformers'
    `from_pretrained` computes them: by `base_model`'s `_init_weights` (the transformers model, no peft wrapper),
    with every parameter marked as loaded so that transformers' init functions leave the parameters alone."""
    for module in base_model.modules():
        if not module._non_persistent_buffers_set:
            continue
        params = list(module.parameters(recurse=False))
        for param in params:
            param._is_hf_initialized = True
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            base_model._init_weights(module)
        for param in params:
            del param._is_hf_initialized


def check_materialized(model: nn.Module) -> None:
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"still on the meta device after loading: {left[:3]}")
