"""Every example config parses and passes the recipe's checks; the offline ones really train a step."""

from __future__ import annotations

import pytest

from automodel.config import load_config
from automodel.training.kd import KDRecipe
from automodel.training.recipe import FinetuneRecipe
from tests.conftest import REPO_ROOT

EXAMPLES = sorted((REPO_ROOT / "examples").glob("llm_*/*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_is_valid(path):
    cfg = load_config(path)
    recipe = {"llm_finetune": FinetuneRecipe, "llm_kd": KDRecipe}[cfg["recipe"]](cfg)  # checks every section
    assert recipe.settings.steps.grad_accumulation_steps(1) >= 1
    assert (recipe.settings.kd is not None) == (path.parent.name == "llm_kd")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stories260K_squad_peft", "stories260K_squad_sft"])
def test_offline_example_trains(tmp_path, name):
    cfg = load_config(REPO_ROOT / "examples" / "llm_finetune" / f"{name}.yaml", [
        "--step_scheduler.max_steps", "2", "--step_scheduler.global_batch_size", "4",
        "--step_scheduler.local_batch_size", "2", "--dataset.limit_dataset_samples", "16",
        "--validation_dataset.limit_dataset_samples", "4", f"--checkpoint.checkpoint_dir={tmp_path}"])
    result = FinetuneRecipe(cfg).run()
    assert result.steps == 2 and (result.final_dir / "model").is_dir()
