"""Every example config parses and passes the recipe's checks; the offline ones really train a step."""

from __future__ import annotations

import pytest

from automodel.config import load_config
from automodel.training.recipe import FinetuneRecipe
from tests.conftest import REPO_ROOT

EXAMPLES = sorted((REPO_ROOT / "examples" / "llm_finetune").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_is_valid(path):
    cfg = load_config(path)
    recipe = FinetuneRecipe(cfg)  # checks sections, typed settings and batch arithmetic
    assert recipe.grad_acc >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stories260K_squad_peft", "stories260K_squad_sft"])
def test_offline_example_trains(tmp_path, name):
    cfg = load_config(REPO_ROOT / "examples" / "llm_finetune" / f"{name}.yaml", [
        "--step_scheduler.max_steps", "2", "--step_scheduler.global_batch_size", "4",
        "--step_scheduler.local_batch_size", "2", "--dataset.limit_dataset_samples", "16",
        "--validation_dataset.limit_dataset_samples", "4", f"--checkpoint.checkpoint_dir={tmp_path}"])
    result = FinetuneRecipe(cfg).run()
    assert result.steps == 2 and (result.final_dir / "model").is_dir()
