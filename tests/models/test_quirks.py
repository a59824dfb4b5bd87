"""Architecture-specific handling: the MoE router aux loss (automodel/models/router_aux_loss.py), Gemma 2 attention."""

from __future__ import annotations

import json
import math

import pytest
import torch

from automodel.errors import UserError
from automodel.models import load_causal_lm
from automodel.models.registry import BY_NAME, native_rows
from automodel.batch import shift_labels
from automodel.training.recipe import FinetuneRecipe
from tests.models.test_architectures import first_batch, one_thread, run_config  # noqa: F401 (fixture)
from tests.models.tiny import write_tiny_checkpoint


def _has_aux_loss(row) -> bool:
    from transformers import AutoConfig

    return hasattr(AutoConfig.for_model(row.model_type), "router_aux_loss_coef")


AUX_ROWS = [row for row in native_rows() if row.kind == "moe" and _has_aux_loss(row)]


def aux_config(row, model_dir, out_dir, coef=0.5) -> dict:
    cfg = run_config(row, model_dir, out_dir, lora=False)
    cfg["model"]["output_router_logits"] = True
    if coef is not None:
        cfg["model"]["router_aux_loss_coef"] = coef
    return cfg


def test_every_moe_row_with_a_load_balancing_loss_is_covered():
    assert {r.model_type for r in AUX_ROWS} == {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe",
                                                "granitemoeshared"}


@pytest.mark.parametrize("row", AUX_ROWS, ids=[r.test_id for r in AUX_ROWS])
def test_router_aux_loss_is_added_and_its_gradient_reaches_the_router(row, tmp_path):
    model_dir = write_tiny_checkpoint(row, tmp_path / "model")
    recipe = FinetuneRecipe(aux_config(row, model_dir, tmp_path / "out"))
    recipe.setup()
    batch = first_batch(recipe, tokens=64)
    recipe.parts.model.train()
    output = recipe.parts.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    cross_entropy = recipe.parts.forward_loss.loss_fn(output.logits, shift_labels(batch["labels"]))
    total = recipe.parts.forward_loss.router_aux.add(cross_entropy, output, batch["labels"])
    label_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert output.aux_loss > 0
    torch.testing.assert_close(total - cross_entropy, 0.5 * output.aux_loss * label_tokens)

    (total - cross_entropy).backward()  # the aux term alone
    routers = {n: p for n, p in recipe.parts.model.named_parameters()
               if "Router" in type(recipe.parts.model.get_submodule(n.rsplit(".", 1)[0])).__name__}
    assert len(routers) == 2, list(routers)  # one per layer
    for name, param in routers.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no aux-loss gradient reached {name}"
    final_norm = recipe.parts.model.model.norm.weight  # after the last router: the aux loss cannot depend on it
    assert final_norm.grad is None or not final_norm.grad.any()


def test_router_aux_loss_is_reported_per_step_and_not_in_validation(tmp_path):
    row = BY_NAME["MixtralForCausalLM"]
    model_dir = write_tiny_checkpoint(row, tmp_path / "model")
    cfg = aux_config(row, model_dir, tmp_path / "out")
    cfg["validation_dataset"] = dict(cfg["dataset"])
    recipe = FinetuneRecipe(cfg)
    result = recipe.run()
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == len(result.train_losses) == 3
    assert all(r["router_aux_loss"] > 0 and r["router_aux_loss_coef"] == 0.5 for r in train)
    validation = [r for r in records if r["kind"] != "train"]
    assert validation and all("router_aux_loss" not in r for r in validation)
    assert all(math.isfinite(x) for x in result.train_losses)


def test_router_aux_loss_on_a_model_without_one_is_a_one_line_error(tmp_path):
    for name in ("LlamaForCausalLM", "DeepseekV3ForCausalLM"):
        row = BY_NAME[name]
        model_dir = write_tiny_checkpoint(row, tmp_path / name)
        recipe = FinetuneRecipe(aux_config(row, model_dir, tmp_path / "out", coef=None))
        with pytest.raises(UserError, match="output_router_logits"):  # Llama: unknown key; DeepSeek: no aux loss
            recipe.setup()


def test_gemma2_defaults_to_eager_attention_and_sdpa_is_a_clear_error(tmp_path):
    model_dir = write_tiny_checkpoint(BY_NAME["Gemma2ForCausalLM"], tmp_path / "gemma2")
    assert load_causal_lm(str(model_dir)).config._attn_implementation == "eager"
    with pytest.raises(UserError, match="model.pretrained_model_name_or_path: .*scaled_dot_product_attention"):
        load_causal_lm(str(model_dir), attn_implementation="sdpa")
    llama_dir = write_tiny_checkpoint(BY_NAME["LlamaForCausalLM"], tmp_path / "llama")
    # Where transformers picks sdpa, the loader runs automodel's SDPA driver (automodel/models/attention.py).
    assert load_causal_lm(str(llama_dir)).config._attn_implementation == "automodel_sdpa"
