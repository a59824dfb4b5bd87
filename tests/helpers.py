"""Small configs for real runs on the shared assets (stories260K + SQuAD v1.1)."""

from __future__ import annotations

import copy

from tests.conftest import SQUAD_DEV, SQUAD_TRAIN, STORIES


def tiny_squad_config(tmp_path, peft: bool = True, max_steps: int = 20, train_samples: int = 160,
                      global_batch: int = 8, local_batch: int = 4) -> dict:
    """A short, real fine-tune: stories260K on the first `train_samples` SQuAD questions, seq_length 256."""
    cfg = {
        "recipe": "llm_finetune",
        "seed": 1234,
        "model": {"pretrained_model_name_or_path": str(STORIES), "dtype": "float32"},
        "dataset": {"_target_": "automodel.data.squad.make_squad_dataset", "dataset_name": str(SQUAD_TRAIN),
                    "split": "train", "seq_length": 256, "limit_dataset_samples": train_samples},
        "validation_dataset": {"_target_": "automodel.data.squad.make_squad_dataset", "dataset_name": str(SQUAD_DEV),
                               "split": "validation", "seq_length": 256, "limit_dataset_samples": 32},
        "step_scheduler": {"global_batch_size": global_batch, "local_batch_size": local_batch,
                           "max_steps": max_steps, "val_every_steps": max(1, max_steps // 2), "log_every_steps": 5},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 3e-3 if peft else 1e-3, "weight_decay": 0.0},
        "lr_scheduler": {"decay": "cosine", "warmup_steps": 2},
        "clip_grad_norm": {"max_norm": 1.0},
        "checkpoint": {"checkpoint_dir": str(tmp_path / "ckpt")},
        # No bars, no metrics.png: tests/test_monitoring.py checks the plot (drawing it is a good part of a tiny
        # run's time, paid by every run of the suite otherwise).
        "logging": {"progress_bar": False, "plot": False},
    }
    if peft:
        cfg["peft"] = {"target_modules": "all-linear", "dim": 8, "alpha": 32}
    return copy.deepcopy(cfg)
