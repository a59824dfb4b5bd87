"""`automodel export STEP_DIR`: turn a step folder's training state (DCP) into the HF-loadable `model/` folder.

Runs offline in one process whatever the number of processes that trained: DCP reshards on load.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from automodel.checkpoint.hf_writer import write_hf_model
from automodel.checkpoint.provenance import check_trusted
from automodel.checkpoint.save import CheckpointConfig
from automodel.checkpoint.state import load_model_state
from automodel.config import check_targets, parse_section, target_policy
from automodel.config.loader import load_yaml
from automodel.config.redact import read_run_config
from automodel.config.switches import check_saved_config
from automodel.errors import UserError
from automodel.models.build import build_model
from automodel.paths import check_not_link, check_output_folder
from automodel.training.tokenizer import build_tokenizer

logger = logging.getLogger("automodel")


def export_step(step_dir: str | Path, output: str | Path | None = None, trust_pickled_state: bool = False,
                allow_targets: tuple[str, ...] = (), trust_remote_code: bool = False) -> Path:
    step_dir = Path(step_dir)
    if not (step_dir / "dcp").is_dir() or not (step_dir / "config.yaml").is_file():
        raise UserError(f"export: {step_dir} is not an automodel step folder (expected dcp/ and config.yaml)")
    check_trusted(step_dir, trust_pickled_state, "export", "pass --trust-pickled-state")
    target = Path(output) if output else step_dir / "model"
    check_output_folder(target, "--output", [step_dir / "dcp"])
    if target.exists():
        raise UserError(f"export: {target} already exists; remove it or pass --output DIR")
    cfg = read_run_config(step_dir / "config.yaml")
    # The saved config may come from anyone: its trust switches need this command's own flags.
    check_saved_config(cfg, step_dir / "config.yaml", trust_remote_code, allow_targets)
    policy = target_policy(cfg, allow_targets)
    check_targets(cfg, policy)
    # One process, no process group: the model as the run built it, then its trained state (DCP reshards).
    tokenizer, model = build_tokenizer(cfg, policy), build_model(cfg, policy=policy)
    load_model_state(step_dir, model)
    partial = check_not_link(target.with_name(f".{target.name}.partial"), "--output")  # else written through
    shutil.rmtree(partial, ignore_errors=True)
    max_shard_size = parse_section(CheckpointConfig, cfg.get("checkpoint"), "checkpoint").max_shard_size
    written = load_yaml(step_dir / "config.yaml")  # the model path as the run wrote it (no secrets at rest)
    write_hf_model(model, tokenizer, partial, max_shard_size=max_shard_size,
                   base_as_written=(written.get("model") or {}).get("pretrained_model_name_or_path"))
    os.replace(partial, target)  # the folder appears complete or not at all
    logger.info("exported %s to %s", step_dir, target)
    return target
