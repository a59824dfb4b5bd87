"""Real fine-tunes of the pretrained stories260K on real SQuAD: loss falls, outputs load in HF libraries."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from automodel.batch import pad_collate
from automodel.training.recipe import FinetuneRecipe
from tests.helpers import tiny_squad_config

pytestmark = pytest.mark.slow


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _first_batch(recipe, n=4):
    return pad_collate([recipe.parts.data.val_set[i] for i in range(n)], recipe.parts.tokenizer.pad_token_id)


def _assert_learned(result):
    first, last = sum(result.train_losses[:3]) / 3, sum(result.train_losses[-3:]) / 3
    assert last < first * 0.95, f"training loss did not fall: {result.train_losses}"
    steps = sorted(result.val_losses)
    assert result.val_losses[steps[-1]] < result.val_losses[steps[0]], result.val_losses


def test_lora_learns_saves_peft_adapter_and_keeps_base_weights(tmp_path, stories_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = FinetuneRecipe(tiny_squad_config(tmp_path, peft=True))
    recipe.setup()
    base_before = {k: v.clone() for k, v in recipe.parts.model.base_model.model.state_dict().items() if "lora_" not in k}
    result = recipe.train()
    _assert_learned(result)

    base_after = {k: v for k, v in recipe.parts.model.base_model.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), "LoRA changed a base weight"

    model_dir = result.final_dir / "model"
    assert (model_dir / "adapter_config.json").is_file()
    adapter = load_file(model_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter), "the adapter file must hold only LoRA weights"
    assert json.loads((model_dir / "adapter_config.json").read_text())["r"] == 8
    assert (result.final_dir.parent / "LATEST").read_text().strip() == result.final_dir.name

    batch = _first_batch(recipe)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stories_path), model_dir)
    torch.testing.assert_close(_logits(reloaded, batch), _logits(recipe.parts.model, batch), rtol=1e-5, atol=1e-5)


def test_full_sft_learns_and_saves_a_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = FinetuneRecipe(tiny_squad_config(tmp_path, peft=False))
    result = recipe.run()
    _assert_learned(result)

    model_dir = result.final_dir / "model"
    assert (model_dir / "config.json").is_file() and list(model_dir.glob("*.safetensors"))
    assert (model_dir / "generation_config.json").is_file()
    AutoTokenizer.from_pretrained(model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = _first_batch(recipe)
    torch.testing.assert_close(_logits(reloaded, batch), _logits(recipe.parts.model, batch), rtol=1e-5, atol=1e-5)
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [5, 10, 15, 20]
    assert (tmp_path / "ckpt" / "config.yaml").is_file()


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "sft"])
def test_gradient_accumulation_equals_one_large_batch(tmp_path, peft):
    """4 micro-batches of 2 give the gradients of 1 batch of 8 despite different padding per micro-batch.

    Tolerance (fp32): every element within 1e-5 x the tensor's largest gradient (summation order differs)."""
    recipe = FinetuneRecipe(tiny_squad_config(tmp_path, peft=peft, global_batch=8, local_batch=2, train_samples=16))
    recipe.setup()
    items = [recipe.parts.data.train_set[i] for i in range(8)]
    pad = recipe.parts.tokenizer.pad_token_id

    def grads(micro_batches):
        recipe.parts.model.zero_grad(set_to_none=True)
        loss, tokens = recipe.backward(micro_batches)
        return loss / tokens, {n: p.grad.clone() for n, p in recipe.parts.model.named_parameters() if p.requires_grad}

    loss_small, small = grads([pad_collate(items[i:i + 2], pad) for i in range(0, 8, 2)])
    loss_big, big = grads([pad_collate(items, pad)])
    assert small.keys() == big.keys() and any(g.abs().max() > 0 for g in big.values())
    assert loss_small == pytest.approx(loss_big, rel=1e-5)
    for name in small:
        scale = big[name].abs().max().item()  # 0 for LoRA A matrices while B is still zero
        torch.testing.assert_close(small[name], big[name], rtol=0, atol=1e-5 * scale, msg=name)
