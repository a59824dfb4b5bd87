"""`automodel export STEP_DIR`: turn a step folder's training state (DCP) into the HF-loadable `model/` folder.

Runs offline in one process whatever the number of processes that trained: DCP reshards on load.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from automodel.checkpoint.hf_writer import write_hf_model
from automodel.checkpoint.save import CheckpointConfig
from automodel.checkpoint.state import load_model_state
from automodel.config import parse_section
from automodel.config.loader import load_yaml
from automodel.data.tokenizer import build_tokenizer
from automodel.errors import UserError
from automodel.models.build import build_model

logger = logging.getLogger("automodel")


def export_step(step_dir: str | Path, output: str | Path | None = None) -> Path:
    step_dir = Path(step_dir)
    if not (step_dir / "dcp").is_dir() or not (step_dir / "config.yaml").is_file():
        raise UserError(f"export: {step_dir} is not an automodel step folder (expected dcp/ and config.yaml)")
    cfg = load_yaml(step_dir / "config.yaml")
    tokenizer, model = build_tokenizer(cfg), build_model(cfg)  # one process: no process group is joined
    load_model_state(step_dir, model)
    target = Path(output) if output else step_dir / "model"
    if target.exists():
        raise UserError(f"export: {target} already exists; remove it or pass --output DIR")
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    max_shard_size = parse_section(CheckpointConfig, cfg.get("checkpoint"), "checkpoint").max_shard_size
    write_hf_model(model, tokenizer, partial, max_shard_size=max_shard_size)
    os.replace(partial, target)  # the folder appears complete or not at all
    logger.info("exported %s to %s", step_dir, target)
    return target
