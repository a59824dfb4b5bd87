"""Fine-tuning learns the task: a short LoRA run of the real SmolLM2-135M-Instruct on SQuAD answers held-out dev
questions clearly better than the base model it started from (the same questions, the same greedy decoding).

The margin is what a working fine-tune clears easily and a broken one (no learning, wrong labels, a prompt that
generation does not share with training, an adapter that never stops) does not; it is not a golden number.
The GGUF file is dequantised into the cache ($AUTOMODEL_CACHE/gguf) on a machine's first load.
"""

from __future__ import annotations

import json

import pytest

from automodel.training.recipe import FinetuneRecipe
from tests.conftest import ASSETS, SQUAD_DEV, SQUAD_TRAIN

SMOL = ASSETS / "models" / "SmolLM2-135M-Instruct-GGUF"
TEMPLATE = ("<|im_start|>system\nAnswer with a short span copied from the context.<|im_end|>\n<|im_start|>user\n"
            "Context: {context}\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n")
STEPS = 12
F1_MARGIN = 15.0  # points of SQuAD F1 (0-100)


def squad(path, split, limit):
    return {"_target_": "automodel.data.squad.make_squad_dataset", "dataset_name": str(path), "split": split,
            "seq_length": 160, "limit_dataset_samples": limit, "prompt_template": TEMPLATE}


@pytest.mark.slow
def test_short_lora_run_beats_the_base_model_on_held_out_questions(tmp_path):
    cfg = {
        "recipe": "llm_finetune",
        "seed": 1234,
        "model": {"pretrained_model_name_or_path": str(SMOL), "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "peft": {"target_modules": "all-linear", "dim": 16, "alpha": 32},
        "dataset": squad(SQUAD_TRAIN, "train", 400),
        "validation_dataset": squad(SQUAD_DEV, "validation", 12),
        "step_scheduler": {"global_batch_size": 4, "local_batch_size": 4, "max_steps": STEPS, "log_every_steps": 4,
                           "val_generate_at_start": True, "val_generate_every_steps": STEPS},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.0},
        "lr_scheduler": {"decay": "cosine", "warmup_steps": 2},
        "clip_grad_norm": {"max_norm": 1.0},
        "checkpoint": {"checkpoint_dir": str(tmp_path / "ckpt"), "enabled": False},
        "logging": {"progress_bar": False},
    }
    FinetuneRecipe(cfg).run()
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r for r in records if r["kind"] == "generation"}
    assert sorted(scores) == [0, STEPS]
    base, tuned = scores[0], scores[STEPS]
    print(f"\nSmolLM2-135M on 12 dev questions: base F1 {base['f1']:.1f} EM {base['exact_match']:.1f}, "
          f"after {STEPS} LoRA steps F1 {tuned['f1']:.1f} EM {tuned['exact_match']:.1f}")
    assert tuned["f1"] > base["f1"] + F1_MARGIN
    assert tuned["ran_to_max_new_tokens"] <= 1, "the adapter did not learn to end its answers with EOS"
