"""Saving a step from any layout.

Every rank writes its shard of the training state (torch.distributed.checkpoint) into the step's temporary
folder; rank 0 also writes the same Hugging Face folder a single process writes, when this step asks for it.
Sharded parameters (FSDP2 or tensor parallel DTensors) are gathered for that first, on every rank because
gathering is a collective: the PEFT adapter parameter by parameter, a full model through
`get_model_state_dict(full_state_dict=True, cpu_offload=True)`, which hands rank 0 one full CPU copy and the
other ranks nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from automodel.checkpoint import TrainState, prune, save_hf_model, save_step, save_training_state, write_config
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

    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return retie_shared_parameters(model, state_dict)


def retie_shared_parameters(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make the names of one shared parameter (tied input embedding and output head) point at one gathered tensor
    again. Gathering copies each name separately, and transformers' save_pretrained recognises tied weights by
    shared storage: without this the FSDP2 `model/` folder would carry an extra `lm_head.weight` that a
    single-process save (and the input checkpoint) does not."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for names in names_of.values():
        present = [name for name in names if name in state_dict]  # rank 0 holds the copy; the others hold none
        for alias in present[1:]:
            state_dict[alias] = state_dict[present[0]]
    return state_dict


def save_checkpoint(parallel: Parallelism, model: nn.Module, tokenizer, cfg: dict, out_dir: Path, step: int, *,
                    optimizer, lr_scheduler, state: TrainState, consolidated: bool,
                    keep_last_n: int | None = None) -> Path | None:
    """Publish `<out_dir>/step_<step>/` (training state, config, and `model/` when `consolidated`); every rank
    must call this. Returns the step folder on rank 0, None elsewhere."""
    hf_model = parallel.unwrap(model)
    state_dict = None
    if consolidated and is_sharded(hf_model):
        gather = gather_adapter_state_dict if is_peft_model(hf_model) else gather_full_state_dict
        state_dict = gather(hf_model)

    def write(folder: Path) -> None:
        save_training_state(folder, model, optimizer, lr_scheduler, state)
        if parallel.is_main:
            if consolidated:
                save_hf_model(hf_model, tokenizer, folder / "model", state_dict=state_dict)
            write_config(cfg, folder / "config.yaml")

    path = save_step(out_dir, step, write, is_main=parallel.is_main, barrier=parallel.barrier)
    if not parallel.is_main:
        return None
    if keep_last_n:
        prune(out_dir, keep_last_n)
    logger.info("saved checkpoint %s%s", path, " (with HF model/)" if consolidated else "")
    return path
