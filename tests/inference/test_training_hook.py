"""step_scheduler.val_generate_every_steps: SQuAD scores by generation during training, without disturbing it."""

from __future__ import annotations

import json

import pytest

from automodel.errors import UserError
from automodel.training.recipe import FinetuneRecipe
from tests.helpers import tiny_squad_config

pytestmark = pytest.mark.slow


def short_config(tmp_path, every):
    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=2, train_samples=8, global_batch=4, local_batch=4)
    cfg["dataset"]["seq_length"] = cfg["validation_dataset"]["seq_length"] = 128
    cfg["validation_dataset"]["limit_dataset_samples"] = 4
    cfg["step_scheduler"].update(log_every_steps=1, val_every_steps=None, val_generate_every_steps=every)
    return cfg


def test_generation_scores_are_logged_and_training_is_unchanged(tmp_path):
    hooked = short_config(tmp_path / "a", every=1)
    hooked["step_scheduler"]["val_generate_at_start"] = True  # step 0: the base model's score
    with_hook = FinetuneRecipe(hooked).run()
    without = FinetuneRecipe(short_config(tmp_path / "b", every=None)).run()
    assert with_hook.train_losses == without.train_losses  # generation neither reseeds nor changes weights
    records = [json.loads(line) for line in (tmp_path / "a" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    generation = [r for r in records if r["kind"] == "generation"]
    assert [r["step"] for r in generation] == [0, 1, 2] and all(r["total"] == 4 for r in generation)
    assert all(0 <= r["ran_to_max_new_tokens"] <= 4 for r in generation)
    assert all(0 <= r["exact_match"] <= r["f1"] + 1e-9 <= 100 + 1e-9 for r in generation)
    plain = [json.loads(line) for line in (tmp_path / "b" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in plain if r["kind"] == "generation"]


def test_zero_interval_is_rejected(tmp_path):
    cfg = short_config(tmp_path, every=1)
    cfg["step_scheduler"]["val_generate_every_steps"] = 0
    with pytest.raises(UserError, match="val_generate_every_steps must be >= 1 or null"):
        FinetuneRecipe(cfg)
