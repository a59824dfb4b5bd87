"""Tensor parallelism with `torch.distributed.tensor.parallel`, driven by the model's own transformers TP plan.

transformers ships a plan per architecture (`config.base_model_tp_plan`, e.g. Llama's
`{"layers.*.self_attn.q_proj": "colwise", ..., "layers.*.mlp.down_proj": "rowwise"}`); each entry becomes
torch's `ColwiseParallel` / `RowwiseParallel` on the matching modules of the base model. Embeddings, norms
and the output head stay replicated. Under LoRA the frozen projection is split the same way and the adapter
follows it: lora_B column-wise after a column-wise layer, lora_A row-wise before a row-wise one.
"""

from __future__ import annotations

import re

from torch import nn

from automodel.errors import UserError
from automodel.models.unwrap import transformers_model

SUPPORTED_STYLES = ("colwise", "rowwise")


def model_tp_plan(model: nn.Module) -> dict[str, str]:
    base = transformers_model(model)
    plan = getattr(base.config, "base_model_tp_plan", None)
    if not plan:
        raise UserError(f"distributed.tp_size: transformers provides no tensor-parallel plan for "
                        f"{type(base).__name__} (config.base_model_tp_plan is empty); use tp_size 1")
    return dict(plan)


def check_heads_split(model: nn.Module, tp_size: int) -> None:
    """Column-wise q/k/v give each rank whole heads only when the head counts divide by tp_size."""
    config = transformers_model(model).config
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, name, None)
        if heads is not None and heads % tp_size:
            raise UserError(f"distributed.tp_size {tp_size}: the model's {name} ({heads}) is not divisible by it")


def _pattern(key: str) -> re.Pattern:
    # '*' in a transformers plan stands for one name component (a layer index).
    return re.compile("\\.".join("[^.]+" if part == "*" else re.escape(part) for part in key.split(".")) + "$")


def _styles(style: str):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return ColwiseParallel() if style == "colwise" else RowwiseParallel()


def _entries(name: str, module: nn.Module, style: str) -> dict[str, object]:
    """Plan entries for one planned module; a peft LoRA layer splits its base layer and one adapter matrix."""
    if not hasattr(module, "base_layer"):
        return {name: _styles(style)}
    adapter = "lora_B" if style == "colwise" else "lora_A"
    entries = {f"{name}.base_layer": _styles(style)}
    for adapter_name in getattr(module, adapter):
        entries[f"{name}.{adapter}.{adapter_name}"] = _styles(style)
    return entries


def build_plan(model: nn.Module) -> tuple[nn.Module, dict[str, object]]:
    """(the base model the plan is relative to, {module name: torch ParallelStyle})."""
    root = transformers_model(model).base_model
    if any(getattr(module, "lora_magnitude_vector", None) for module in root.modules()):
        # DoRA's forward takes each adapted weight's row norms: a split weight would need a norm across ranks
        raise UserError("peft.use_dora: DoRA cannot run with tensor parallelism (distributed.tp_size > 1); set "
                        "tp_size 1 (FSDP2 and DDP train DoRA) or use_dora false")
    plan = {}
    for key, style in model_tp_plan(model).items():
        if style not in SUPPORTED_STYLES:
            raise UserError(f"distributed.tp_size: the model's TP plan uses style '{style}' for '{key}'; "
                            f"supported: {', '.join(SUPPORTED_STYLES)}")
        pattern = _pattern(key)
        for name, module in root.named_modules():
            if pattern.match(name):
                plan.update(_entries(name, module, style))
    if not plan:
        raise UserError(f"distributed.tp_size: the TP plan of {type(transformers_model(model)).__name__} matches none of "
                        "its modules")
    return root, plan


def apply_tp(model: nn.Module, mesh) -> nn.Module:
    """Split the planned projections of `model` in place over the 1-D `mesh`; returns the model."""
    from torch.distributed.tensor.parallel import parallelize_module

    check_heads_split(model, mesh.size())
    root, plan = build_plan(model)
    parallelize_module(root, mesh, plan)
    return model
