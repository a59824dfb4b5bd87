"""The top-level sections a recipe config may have: the contract NeMo AutoModel users know."""

from __future__ import annotations

from typing import Any

from automodel.config.loader import did_you_mean
from automodel.errors import UserError

SECTIONS: dict[str, str] = {
    "recipe": "which recipe runs this file (llm_finetune, llm_kd)",
    "seed": "random seed for weights of new layers, data order and dropout",
    "precision": "auto (default: bf16 where the device computes it natively, else fp32), fp32, bf16, bf16-mixed, "
                 "bf16-frozen (docs/guides/llm/precision.md)",
    "model": "the model: pretrained_model_name_or_path, attn_implementation, trust_remote_code (dtype: older "
             "form of precision)",
    "tokenizer": "optional tokenizer override: pretrained_model_name_or_path or _target_, add_bos, add_eos, "
                 "padding_side, chat_template (default: the model's)",
    "peft": "LoRA settings: target_modules, exclude_modules, dim, alpha, dropout, use_rslora, use_dora, "
            "init_lora_weights, quantization (QLoRA) (absent: full SFT)",
    "dataset": "training data: _target_ builder and its arguments",
    "validation_dataset": "validation data: _target_ builder and its arguments",
    "packed_sequence": "packed_sequence_size: pack examples into rows of this many tokens (0: off, the default)",
    "dataloader": "training DataLoader options (num_workers, shuffle, group_by_length, megabatch_factor, shuffle_buffer_size, ...)",
    "validation_dataloader": "validation DataLoader options",
    "loss_fn": "loss: _target_ (default masked cross-entropy over label tokens), chunk_size (label tokens per "
               "chunk of the output head, default 1024; null: logits at the label positions in one piece)",
    "teacher_model": "kd recipe: the frozen teacher, any model the `model` section could name "
                     "(pretrained_model_name_or_path, gguf_file, dtype, ...); same vocabulary as the student",
    "kd_ratio": "kd recipe: loss = (1 - kd_ratio) x cross-entropy + kd_ratio x KD (default 0.5)",
    "kd_loss_fn": "kd recipe: temperature (> 0, default 1), chunk_size (label tokens per chunk of both heads)",
    "optimizer": "optimizer: _target_ (e.g. torch.optim.AdamW) and its arguments",
    "lr_scheduler": "learning-rate schedule: warmup_steps, decay (cosine/linear/constant), min_lr",
    "step_scheduler": "global_batch_size, local_batch_size, max_steps, num_epochs, val/ckpt/log every N steps",
    "clip_grad_norm": "max_norm for gradient clipping (null: off)",
    "checkpoint": "checkpoint_dir and what to save",
    "distributed": "strategy (auto, fsdp2, ddp, none), tp_size, activation_checkpointing, cpu_offload",
    "dist_env": "backend (auto: nccl on CUDA, gloo on CPU) and timeout_minutes for torch.distributed",
    "allow_targets": "packages beyond the trusted defaults that _target_ may name: your own code; from the command line "
                     "only (--allow-target), a file may only repeat them (docs/security.md)",
    "logging": "level, metrics_file, progress_bar, plot, mfu.peak_tflops; trackers: wandb, mlflow, tensorboard",
}


# Sections that hold a value of their own rather than a mapping of settings.
NOT_MAPPINGS = {"recipe", "seed", "precision", "clip_grad_norm", "tokenizer", "allow_targets", "kd_ratio"}


def check_sections(cfg: dict[str, Any]) -> None:
    """Unknown top-level sections are typos until proven otherwise; the others must be mappings (or empty)."""
    for name, value in cfg.items():
        if name not in SECTIONS:
            raise UserError(f"unknown config section '{name}'{did_you_mean(name, SECTIONS)}; "
                            f"known sections: {', '.join(SECTIONS)}")
        if name not in NOT_MAPPINGS and value is not None and not isinstance(value, dict):
            raise UserError(f"{name}: expected a mapping of settings, got {value!r}")
    seed = cfg.get("seed", 42)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed: expected an integer, got {seed!r}")
