"""Adapter variants through peft: DoRA, rsLoRA, peft's initialisations, QLoRA (4-bit base through bitsandbytes).

Each trains for real on stories260K + SQuAD, saves a peft adapter that `PeftModel.from_pretrained` loads,
merges with `merge-lora`, and keeps LoRA's guarantees: a resumed run is bit-identical to an uninterrupted one, and
(tests/models/test_meta_build.py) 2-process FSDP2 trains DoRA like the whole model in one process.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from automodel.cli.main import main
from automodel.errors import UserError
from automodel.peft import LoraSettings
from automodel.training.recipe import FinetuneRecipe
from tests.conftest import STORIES
from tests.distributed_helpers import eval_batch, logits_of, losses
from tests.helpers import tiny_squad_config

DORA_RSLORA = {"use_dora": True, "use_rslora": True, "init_lora_weights": "gaussian", "dim": 4, "alpha": 8}


def variant_config(tmp_path, max_steps=3, **peft):
    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=max_steps, train_samples=24, global_batch=4, local_batch=2)
    cfg["dataset"]["seq_length"] = cfg["validation_dataset"]["seq_length"] = 128
    cfg["validation_dataset"]["limit_dataset_samples"] = 4
    cfg["step_scheduler"].update(log_every_steps=1, val_every_steps=2)
    cfg["peft"].update(peft)
    return cfg


@pytest.mark.slow
def test_dora_rslora_adapter_loads_in_peft_and_merges(tmp_path, stories_tokenizer):
    FinetuneRecipe(variant_config(tmp_path, **DORA_RSLORA)).run()
    adapter = tmp_path / "ckpt" / "step_3" / "model"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["use_dora"], config["use_rslora"], config["init_lora_weights"], config["r"]) == \
        (True, True, "gaussian", 4)
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights) and all("lora_" in k for k in weights)

    batch = eval_batch(stories_tokenizer)
    adapted = logits_of(adapter, STORIES, batch)  # PeftModel.from_pretrained on the base
    base = logits_of(STORIES, STORIES, batch)
    assert (adapted - base).abs().max() > 1e-3, "the trained DoRA adapter changes the model"
    assert main(["merge-lora", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    assert (logits_of(tmp_path / "merged", STORIES, batch) - adapted).abs().max() < 1e-4

    # vLLM cannot serve DoRA: serve says so before writing anything
    assert main(["serve", str(adapter), "--output", str(tmp_path / "serve")]) == 2
    assert not (tmp_path / "serve").exists()
    assert main(["serve", str(adapter), "--output", str(tmp_path / "serve"), "--merge"]) == 0


@pytest.mark.slow
def test_dora_resume_is_bit_identical(tmp_path):
    def config(root, max_steps):
        cfg = variant_config(root, max_steps=max_steps, **DORA_RSLORA)
        cfg.pop("validation_dataset")
        cfg["step_scheduler"]["val_every_steps"] = None
        return cfg

    FinetuneRecipe(config(tmp_path / "a", 2)).run()
    FinetuneRecipe(config(tmp_path / "b", 1)).run()
    resumed = FinetuneRecipe(config(tmp_path / "b", 2))
    resumed.run()
    assert resumed.start_step == 1
    assert losses(tmp_path / "b" / "ckpt") == losses(tmp_path / "a" / "ckpt")
    a, b = (load_file(p / "ckpt" / "step_2" / "model" / "adapter_model.safetensors") for p in (tmp_path / "a",
                                                                                            tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_qlora_trains_a_4bit_base_and_saves_an_ordinary_adapter(tmp_path, stories_tokenizer):
    quantization = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    recipe = FinetuneRecipe(variant_config(tmp_path, max_steps=4, quantization=quantization))
    result = recipe.run()  # validation at step 2 runs the 4-bit layers in eval mode between training steps
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in recipe.parts.model.modules()), "the base is in 4 bits"
    adapter = result.final_dir / "model"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(STORIES)
    assert not any("quant" in k for k in config if config[k])
    train = losses(tmp_path / "ckpt")
    assert train[-1] < train[0]
    batch = eval_batch(stories_tokenizer)
    adapted = logits_of(adapter, STORIES, batch)  # on the unquantised fp32 base
    assert (adapted - logits_of(STORIES, STORIES, batch)).abs().max() > 1e-3, "steps 3-4 trained the adapter too"


@pytest.mark.parametrize("peft, message", [
    ({"init_lora_weights": "pissa"}, "peft: init_lora_weights: 'pissa' changes the base model's weights"),
    ({"init_lora_weights": "nonsense"}, "peft: init_lora_weights: expected one of True, False, 'gaussian', "
                                        "'orthogonal', got 'nonsense'"),
    ({"quantization": {"bits": 8}}, "peft.quantization.bits: expected one of 4, got 8"),
    ({"quantization": {"type": "int4"}}, "peft.quantization.type: expected one of 'nf4', 'fp4'"),
])
def test_bad_variant_settings_are_one_line(peft, message):
    from automodel.config.instantiate import parse_section

    with pytest.raises(UserError, match=message):
        parse_section(LoraSettings, peft, "peft")
