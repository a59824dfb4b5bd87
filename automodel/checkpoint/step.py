"""Saving a step from any layout.

Every rank writes its shard of the training state (torch.distributed.checkpoint) into the step's temporary
folder; when this step asks for it, the ranks also write the Hugging Face `model/` folder together
(checkpoint/hf_writer.py: gathered one tensor at a time, written by rank 0), the same folder a single process writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from automodel.checkpoint.hf_writer import DEFAULT_MAX_SHARD_SIZE, write_hf_model
from automodel.checkpoint.save import prune, save_step, write_config
from automodel.checkpoint.state import TrainState, save_training_state
from automodel.models.unwrap import without_ddp

logger = logging.getLogger("automodel")


def save_checkpoint(parallel, model: nn.Module, tokenizer, cfg: dict, out_dir: Path, step: int, *,
                    optimizer, lr_scheduler, state: TrainState, consolidated: bool,
                    keep_last_n: int | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path | None:
    """Publish `<out_dir>/step_<step>/` (training state, config, and `model/` when `consolidated`); every rank
    of `parallel` (distributed/parallel.py) must call this. Returns the step folder on rank 0, None elsewhere."""
    peft_or_base_model = without_ddp(model)  # what `model/` holds: peft's adapter or the transformers model

    def write(folder: Path) -> None:
        save_training_state(folder, model, optimizer, lr_scheduler, state)
        if consolidated:
            write_hf_model(peft_or_base_model, tokenizer, folder / "model", is_main=parallel.is_main,
                           max_shard_size=max_shard_size,  # `cfg` is the config at rest: the path as written
                           base_as_written=(cfg.get("model") or {}).get("pretrained_model_name_or_path"))
        if parallel.is_main:
            write_config(cfg, folder / "config.yaml")

    path = save_step(out_dir, step, write, is_main=parallel.is_main, barrier=parallel.barrier)
    if not parallel.is_main:
        return None
    if keep_last_n:
        prune(out_dir, keep_last_n)
    logger.info("saved checkpoint %s%s", path, " (with HF model/)" if consolidated else "")
    return path
