"""The `precision` setting (automodel/config/precision.py): what each value decides, that a run follows it (stored
dtypes, autocast compute, the banner) and its one-line errors."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import pytest
import torch

from automodel.cli.main import main
from automodel.config.precision import native_bf16, resolve_precision
from automodel.errors import UserError
from automodel.training.recipe import FinetuneRecipe
from tests.helpers import tiny_squad_config

CPU = torch.device("cpu")
HAS_BF16, _ = native_bf16(CPU)
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")


def test_auto_asks_the_cpu_and_picks_frozen_for_peft_and_mixed_for_full_sft():
    lora, full = resolve_precision({}, CPU, peft=True), resolve_precision({}, CPU, peft=False)
    if not HAS_BF16:
        assert lora.name == full.name == "fp32" and "neither AVX512-BF16 nor AMX" in lora.reason
        return
    assert (lora.name, lora.weights_dtype, lora.trainable_dtype, lora.compute_dtype) == \
        ("bf16-frozen", torch.bfloat16, torch.float32, torch.bfloat16)
    assert (full.name, full.weights_dtype, full.trainable_dtype, full.compute_dtype) == \
        ("bf16-mixed", torch.float32, torch.float32, torch.bfloat16)
    assert lora.reason.startswith("auto: this CPU computes bf16 natively (AVX512-BF16")


def test_fp32_and_the_older_model_dtype_keep_everything_in_float32():
    for cfg in ({"precision": "fp32"}, {"model": {"dtype": "float32"}}):
        precision = resolve_precision(cfg, CPU, peft=True)
        assert precision.name == "fp32" and not precision.mixed
        assert {precision.weights_dtype, precision.trainable_dtype, precision.compute_dtype} == {torch.float32}
        assert precision.forward_context(CPU) is nullcontext
    pure = resolve_precision({"model": {"dtype": "bfloat16"}}, CPU, peft=False)
    assert pure.name == "bf16-true" and pure.trainable_dtype == torch.bfloat16 and not pure.mixed


@pytest.mark.parametrize("cfg, peft, message", [
    ({"precision": "bf8"}, False, r"precision: expected one of auto, fp32, bf16, bf16-mixed, bf16-frozen, got 'bf8'"),
    ({"precision": "bf16-frozen"}, False, "precision: bf16-frozen keeps a frozen base in bf16 and needs a `peft`"),
    ({"precision": "bf16-mixed", "model": {"dtype": "float32"}}, False,
     "model.dtype: float32 contradicts precision: bf16-mixed"),
    ({"model": {"dtype": "float64"}}, False, "model.dtype: expected one of"),
])
def test_bad_precision_settings_are_one_line(cfg, peft, message):
    with pytest.raises(UserError, match=message):
        resolve_precision(cfg, CPU, peft=peft)


def test_bf16_on_a_device_without_it_names_the_device_and_auto_falls_back_to_fp32():
    device = torch.device("meta")  # a device torch reports no bf16 check for
    with pytest.raises(UserError, match="precision: bf16 needs native bf16, and device meta is not checked"):
        resolve_precision({"precision": "bf16"}, device, peft=True)
    assert resolve_precision({}, device, peft=True).name == "fp32"


@needs_bf16
def test_a_lora_run_stores_the_base_in_bf16_trains_fp32_adapters_and_computes_in_bf16(tmp_path, caplog):
    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=2, train_samples=16)
    del cfg["model"]["dtype"]  # the default precision
    recipe = FinetuneRecipe(cfg)
    with caplog.at_level(logging.INFO, logger="automodel"):
        recipe.setup()
    assert "precision   bf16-frozen: frozen weights bfloat16, trained weights and optimizer float32" in caplog.text
    frozen = {p.dtype for p in recipe.parts.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in recipe.parts.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    seen = {}  # the fast path: the adapted projections compute in bf16 under the run's autocast
    q_proj = recipe.parts.model.base_model.model.model.layers[0].self_attn.q_proj
    q_proj.register_forward_hook(lambda module, args, out: seen.setdefault("q_proj", out.dtype) and None)
    q_proj.lora_A["default"].register_forward_pre_hook(
        lambda module, args: seen.setdefault("lora_A input", args[0].dtype) and None)
    result = recipe.train()
    assert seen["q_proj"] == torch.bfloat16
    assert seen["lora_A input"] == torch.bfloat16, "peft cast the adapter's input to float32 (no autocast fast path)"
    states = [t for state in recipe.parts.optimizer.state.values() for t in state.values() if t.dim() > 0]
    assert states and {t.dtype for t in states} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.train_losses)


@needs_bf16
def test_full_sft_in_bf16_mixed_keeps_fp32_weights_and_saves_the_checkpoint_dtype(tmp_path):
    cfg = tiny_squad_config(tmp_path, peft=False, max_steps=2, train_samples=16)
    del cfg["model"]["dtype"]
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    assert recipe.parts.parallel.precision.name == "bf16-mixed"
    assert {p.dtype for p in recipe.parts.model.parameters()} == {torch.float32}
    seen = {}
    recipe.parts.model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, args, out: seen.setdefault("down_proj", out.dtype) and None)
    result = recipe.train()
    assert seen["down_proj"] == torch.bfloat16
    from safetensors.torch import load_file

    saved = load_file(result.final_dir / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # stories260K's config says float32


@needs_bf16
def test_the_banner_shows_the_precision_and_why(tmp_path, capfd):
    cfg = tmp_path / "cfg.yaml"
    import yaml

    run = tiny_squad_config(tmp_path, peft=True, max_steps=1, train_samples=8)
    del run["model"]["dtype"]
    run["validation_dataset"] = None
    cfg.write_text(yaml.safe_dump(run))
    assert main(["finetune", "llm", "-c", str(cfg), "--precision", "bf16"]) == 0
    out = capfd.readouterr()
    assert "precision   bf16-frozen: frozen weights bfloat16, trained weights and optimizer float32, compute " \
           "bfloat16 (set in the config)" in out.out + out.err
