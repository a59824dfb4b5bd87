"""Real checkpoints for the after-training commands: short real fine-tunes of stories260K on SQuAD."""

from __future__ import annotations

import pytest
import torch

from automodel.training.recipe import FinetuneRecipe
from tests.conftest import STORIES
from tests.helpers import tiny_squad_config


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    """checkpoint_dir of the standard short LoRA run (tests/helpers.py tiny_squad_config, 20 steps)."""
    root = tmp_path_factory.mktemp("lora_run")
    FinetuneRecipe(tiny_squad_config(root, peft=True)).run()
    return root / "ckpt"


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """checkpoint_dir of a 2-step full fine-tune."""
    root = tmp_path_factory.mktemp("sft_run")
    cfg = tiny_squad_config(root, peft=False, max_steps=2, train_samples=16)
    cfg["validation_dataset"]["limit_dataset_samples"] = 4
    FinetuneRecipe(cfg).run()
    return root / "ckpt"


@pytest.fixture
def fresh_adapter(tmp_path):
    """A LoRA adapter folder on stories260K with non-zero B (so it changes the outputs), saved as training saves."""
    from automodel.checkpoint import write_hf_model
    from automodel.models import load_causal_lm, load_tokenizer
    from automodel.peft import LoraSettings

    torch.manual_seed(0)
    model = LoraSettings(target_modules=["q_proj", "v_proj"], dim=4, alpha=8).apply(load_causal_lm(str(STORIES)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    folder = tmp_path / "adapter"
    write_hf_model(model, load_tokenizer(str(STORIES)), folder)
    return folder
