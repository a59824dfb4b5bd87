"""Fold a LoRA adapter into its base model: one plain HF folder, loadable without peft.

The merged weights are W + (alpha / r) * B @ A for every adapted layer (peft's `merge_and_unload`), in the
base model's stored dtype unless another is asked for; the tokenizer and generation config come along.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from automodel.checkpoint.hf_writer import write_hf_model
from automodel.errors import UserError
from automodel.inference.generate import load_model_and_tokenizer
from automodel.inference.sources import ModelSource
from automodel.paths import check_output_folder

logger = logging.getLogger("automodel")

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def stored_dtype(base: str) -> str:
    """The dtype the base model's config says its weights are in (float32 when it does not say)."""
    from transformers import PretrainedConfig

    # The plain config.json fields: also for the remote-code families automodel reads itself (models/families).
    config, _ = PretrainedConfig.get_config_dict(base)
    dtype = config.get("dtype") or config.get("torch_dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return DTYPE_NAMES.get(dtype, "float32")


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"--output: {output_dir} is not empty; choose a new folder or pass --overwrite")


def merge_lora(source: ModelSource, output_dir: str | Path, dtype: str | None = None,
               trust_remote_code: bool = False, overwrite: bool = False) -> Path:
    """Write base + adapter as one model folder (safetensors, config, tokenizer); returns the folder."""
    if source.adapter is None:
        raise UserError(f"model: {source.base} is not a LoRA adapter or a LoRA checkpoint: nothing to merge")
    output_dir = Path(output_dir)
    check_output_folder(output_dir, "--output", [source.adapter, Path(source.base)])
    check_output_dir(output_dir, overwrite)
    # A GGUF base is quantised and has no float convention of its own: float32 holds its dequantised values exactly,
    # whatever precision the run trained in.
    dtype = dtype or ("float32" if source.gguf_file else stored_dtype(source.base))
    model, tokenizer = load_model_and_tokenizer(source, dtype, trust_remote_code, device="cpu")
    merged = model.merge_and_unload()
    output_dir.mkdir(parents=True, exist_ok=True)
    write_hf_model(merged, tokenizer, output_dir)
    logger.info("merged %s into %s (%s)", source.describe(), output_dir, merged.dtype)
    return output_dir
