"""QLoRA's base built on the meta device and quantised tensor by tensor (models/quantized.py) is the model
transformers' whole-model 4-bit load gives: the same packed nf4 weights and quantisation statistics, the same
unquantised tensors, the same LoRA initial values, the same logits."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM

from automodel.models.build import build_model
from tests.conftest import STORIES

QUANTIZATION = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


def test_meta_built_qlora_equals_the_whole_model_4bit_load(tmp_path, caplog):
    import bitsandbytes as bnb

    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.bfloat16).save_pretrained(folder, max_shard_size="150KB")
    model = {"pretrained_model_name_or_path": str(folder), "dtype": "bfloat16"}
    peft = {"target_modules": "all-linear", "dim": 8, "alpha": 32, "quantization": QUANTIZATION}
    builds = {}
    for path, node in (("whole", {**model, "_target_": "automodel.models.loader.load_causal_lm"}), ("meta", model)):
        torch.manual_seed(7)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="automodel"):
            builds[path] = build_model({"model": node, "peft": peft})
        meta_line = "QLoRA: built on the meta device" in caplog.text
        assert meta_line == (path == "meta"), caplog.text
    whole, meta = builds["whole"], builds["meta"]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in meta.modules()) == 5 * 7  # every linear layer but the head
    want, got = whole.state_dict(), meta.state_dict()
    assert want.keys() == got.keys()
    assert any(name.endswith("weight.absmax") for name in got) and any("lora_A" in name for name in got)
    for name in want:
        assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), name
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, meta(input_ids=ids).logits)
