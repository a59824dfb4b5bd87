"""Saving a step from any layout: rank 0 writes the same Hugging Face folder a single process writes.

Sharded parameters (FSDP2 or tensor parallel DTensors) are gathered first, on every rank because gathering is
a collective: the PEFT adapter parameter by parameter, a full model through torch.distributed.checkpoint's
`get_model_state_dict(full_state_dict=True, cpu_offload=True)`, which hands rank 0 one full CPU copy and the
other ranks nothing. Other kinds of checkpoint (sharded DCP for resuming) belong next to `save_checkpoint`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from automodel.checkpoint import save_hf_model, save_step, write_config
from automodel.distributed.parallel import Parallelism
from automodel.peft import is_peft_model

logger = logging.getLogger("automodel")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gather_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable (adapter) parameters; peft's save_pretrained keeps the LoRA ones."""
    from torch.distributed.tensor import DTensor

    gathered = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if isinstance(param, DTensor) else param
            gathered[name] = full.detach().cpu()
    return gathered


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(parallel: Parallelism, model: nn.Module, tokenizer, cfg: dict, out_dir: Path,
                    step: int) -> Path | None:
    """Publish `<out_dir>/step_<step>/{model/, config.yaml}` from rank 0; every rank must call this.

    Returns the step folder on rank 0, None elsewhere."""
    model = parallel.unwrap(model)
    state_dict = None
    if is_sharded(model):
        state_dict = gather_adapter_state_dict(model) if is_peft_model(model) else gather_full_state_dict(model)
    path = None
    if parallel.is_main:
        def write(folder: Path) -> None:
            save_hf_model(model, tokenizer, folder / "model", state_dict=state_dict)
            write_config(cfg, folder / "config.yaml")

        path = save_step(out_dir, step, write)
        logger.info("saved checkpoint %s", path)
    parallel.barrier()  # nobody runs ahead (or exits) while rank 0 is still writing
    return path
