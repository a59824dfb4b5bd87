"""Atomic checkpoint folders in Hugging Face layout."""

from automodel.checkpoint.save import CheckpointConfig, latest_step_dir, save_hf_model, save_step, write_config

__all__ = ["CheckpointConfig", "latest_step_dir", "save_hf_model", "save_step", "write_config"]
