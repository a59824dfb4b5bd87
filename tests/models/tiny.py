"""Tiny checkpoints of each native architecture in its Hugging Face layout, written with `save_pretrained`.

The vocabulary and special tokens come from a real tokenizer in assets/tokenizers/; the run configs name that
tokenizer in their `tokenizer:` section (a model folder without tokenizer files, as a user would pass one with
`tokenizer.pretrained_model_name_or_path`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from automodel.models.registry import Architecture
from tests.conftest import ASSETS
from tests.models.tiny_configs import tiny_overrides


@lru_cache(maxsize=None)
def shared_tokenizer(name: str):
    """`load_tokenizer` of assets/tokenizers/<name>, loaded once per test session (a config's
    `tokenizer: {_target_: tests.models.tiny.shared_tokenizer, name: ...}`): loading the 150k-token Qwen
    tokenizer 2 x 40 times would cost more than training all the tiny models."""
    from automodel.models import load_tokenizer

    return load_tokenizer(str(ASSETS / "tokenizers" / name))


def tiny_config(row: Architecture, tokenizer):
    from transformers import AutoConfig

    specials = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    return AutoConfig.for_model(row.model_type, **tiny_overrides(row), vocab_size=len(tokenizer), **specials)


def write_tiny_checkpoint(row: Architecture, folder: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model of `row`'s architecture, saved as a real checkpoint folder."""
    from transformers import AutoModelForCausalLM

    tokenizer = shared_tokenizer(name=row.tokenizer)  # by keyword, as the config's _target_ calls it
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(row, tokenizer))
    assert type(model).__name__ == row.native_class, f"{row.model_type} built {type(model).__name__}"
    model.save_pretrained(folder)
    # Published checkpoints name their own architecture (e.g. ExaoneForCausalLM, GritLM), which may differ
    # from the transformers class that loads them; transformers picks the class from model_type.
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = [row.test_id]
    config_file.write_text(json.dumps(config, indent=2))
    return folder
