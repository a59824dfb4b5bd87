"""Atomic checkpoint folders: an HF-loadable `model/` plus the state needed to resume exactly."""

from automodel.checkpoint.hf_writer import write_hf_model
from automodel.checkpoint.resume import check_compatible, find_restore_dir
from automodel.checkpoint.save import (
    CheckpointConfig,
    check_no_links,
    latest_step_dir,
    prune,
    save_step,
    step_dirs,
    write_config,
)
from automodel.checkpoint.state import TrainState, load_training_state, save_training_state
from automodel.checkpoint.step import save_checkpoint

__all__ = ["CheckpointConfig", "TrainState", "check_compatible", "check_no_links", "find_restore_dir", "latest_step_dir",
           "load_training_state", "prune", "save_checkpoint", "save_step", "save_training_state", "step_dirs",
           "write_config", "write_hf_model"]
