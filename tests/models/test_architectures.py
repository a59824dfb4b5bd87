"""Every tested row of the supported-models table (automodel/models/registry.py) trains through the public path.

For each architecture a tiny model (2 layers, hidden 64, the vocabulary of a real tokenizer) is written as a
real checkpoint folder (a remote-code family's in its published layout: tests/models/published.py), then
`FinetuneRecipe` runs a user-style config on real SQuAD rows:
- the folder loads into the architecture's transformers class (remote-code families: with trust_remote_code off);
- LoRA's default `all-linear` adapts exactly the row's projection layers, never the output head; after 3 steps
  every adapter weight changed and no base weight did; the saved adapter reloads with equal logits;
- full SFT: 3 steps change every trainable parameter, losses are finite; the saved model reloads (same
  weight names as the input checkpoint; a remote-code family's config.json unchanged) with equal logits.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from automodel.batch import pad_collate
from automodel.models import load_causal_lm
from automodel.models.families import FAMILIES, PUBLISHED_CONFIG
from automodel.models.registry import tested_rows
from automodel.peft.lora import adapted_targets
from automodel.training.recipe import FinetuneRecipe
from tests.conftest import SQUAD_TRAIN
from tests.models.published import write_published_checkpoint
from tests.models.tiny import write_tiny_checkpoint

ROWS = tested_rows()
STEPS = 3

# Parameter-name suffixes that legitimately receive no gradient (updated by other rules, if at all); none among the
# tested rows today: DeepSeek-V3's routing-bias `e_score_correction_bias` is a buffer, not a parameter.
NO_GRADIENT_BY_DESIGN: tuple[str, ...] = ()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices this small gain nothing from a second intra-op thread, and on a busy machine OpenMP's
    synchronisation makes each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One tiny checkpoint per architecture, shared by its LoRA and SFT tests."""
    built = {}

    def get(row):
        if row.architecture not in built:
            write = write_published_checkpoint if row.published_type else write_tiny_checkpoint
            built[row.architecture] = write(row, tmp_path_factory.mktemp(row.test_id))
        return built[row.architecture]

    return get


def run_config(row, model_dir, out_dir, lora: bool) -> dict:
    # One example per step keeps 37 architectures fast; the hybrid (mamba) rows take two, so their padded
    # batches exercise the mamba layers' padding mask on the CPU path too.
    batch = 2 if row.kind == "hybrid" else 1
    cfg = {
        "recipe": "llm_finetune",
        "seed": 0,
        # fp32: these runs check exact round trips of every architecture (the bf16 precisions are checked on real
        # runs in tests/test_precision.py, test_precision_curves.py and test_distributed_bf16.py).
        "precision": "fp32",
        "model": {"pretrained_model_name_or_path": str(model_dir)},
        "tokenizer": {"_target_": "tests.models.tiny.shared_tokenizer", "name": row.tokenizer},
        "allow_targets": ["tests.models.tiny"],
        "dataset": {"_target_": "automodel.data.squad.make_squad_dataset", "dataset_name": str(SQUAD_TRAIN),
                    "seq_length": 64, "limit_dataset_samples": 2 * batch * STEPS},
        "step_scheduler": {"global_batch_size": batch, "local_batch_size": batch, "max_steps": STEPS,
                           "ckpt_every_steps": STEPS, "log_every_steps": 1},
        # No weight decay: a weight may change only because a gradient reached it.
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-2 if lora else 1e-3, "weight_decay": 0.0},
        "lr_scheduler": {"decay": "constant", "warmup_steps": 0},
        "checkpoint": {"checkpoint_dir": str(out_dir)},
        "logging": {"progress_bar": False, "plot": False},  # the plot: tests/test_monitoring.py
    }
    if lora:
        cfg["peft"] = {"target_modules": "all-linear", "dim": 4, "alpha": 8}
    return cfg


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def first_batch(recipe, tokens: int = 16) -> dict[str, torch.Tensor]:
    """The start of one training example: enough to compare logits, small enough to compare 150k-token vocabularies
    quickly."""
    batch = pad_collate([recipe.parts.data.train_set[0]], recipe.parts.tokenizer.pad_token_id)
    return {k: v[:, :tokens] for k, v in batch.items()}


def assert_loaded_natively(recipe, row, base_model):
    assert row.model_class in [cls.__name__ for cls in type(base_model).__mro__]  # a converted family subclasses it
    if row.published_type:  # read by automodel/models/families, no remote code
        assert getattr(base_model, PUBLISHED_CONFIG)["model_type"] == row.published_type
    else:
        assert base_model.config.model_type == row.model_type


def load_base(row, folder):
    """The saved model as users reload it: transformers for native rows, automodel's loader for the families it
    reads itself."""
    from transformers import AutoModelForCausalLM

    return load_causal_lm(str(folder)) if row.published_type else AutoModelForCausalLM.from_pretrained(folder)


def assert_finite(result):
    assert len(result.train_losses) == STEPS and all(math.isfinite(x) for x in result.train_losses), \
        result.train_losses


@pytest.mark.parametrize("row", ROWS, ids=[r.test_id for r in ROWS])
def test_lora_all_linear_adapts_projections_and_round_trips(row, checkpoint, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model_dir = checkpoint(row)
    recipe = FinetuneRecipe(run_config(row, model_dir, tmp_path / "out", lora=True))
    recipe.setup()
    base = recipe.parts.model.get_base_model()
    assert_loaded_natively(recipe, row, base)
    assert adapted_targets(recipe.parts.model) == set(row.lora_targets)
    assert not isinstance(base.get_output_embeddings(), LoraLayer), "all-linear must not adapt the output head"

    before = snapshot(recipe.parts.model)
    result = recipe.train()
    assert_finite(result)
    after = snapshot(recipe.parts.model)
    lora = [n for n in before if "lora_" in n]
    assert lora and all(recipe.parts.model.get_parameter(n).requires_grad for n in lora)
    unchanged = [n for n in lora if torch.equal(before[n], after[n])]
    assert not unchanged, f"adapter weights that did not train: {unchanged}"
    changed_base = [n for n in before if "lora_" not in n and not torch.equal(before[n], after[n])]
    assert not changed_base, f"LoRA changed base weights: {changed_base}"

    reloaded = PeftModel.from_pretrained(load_base(row, model_dir), result.final_dir / "model")
    batch = first_batch(recipe)
    torch.testing.assert_close(logits(reloaded, batch), logits(recipe.parts.model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row", ROWS, ids=[r.test_id for r in ROWS])
def test_full_sft_changes_every_parameter_and_round_trips(row, checkpoint, tmp_path):
    model_dir = checkpoint(row)
    recipe = FinetuneRecipe(run_config(row, model_dir, tmp_path / "out", lora=False))
    recipe.setup()
    assert_loaded_natively(recipe, row, recipe.parts.model)
    before = snapshot(recipe.parts.model)
    result = recipe.train()
    assert_finite(result)
    after = snapshot(recipe.parts.model)
    unchanged = [n for n in before if torch.equal(before[n], after[n]) and not n.endswith(NO_GRADIENT_BY_DESIGN)]
    assert not unchanged, f"parameters that did not train: {unchanged}"

    saved = result.final_dir / "model"
    derived = set(FAMILIES[row.published_type].derived_buffers) if row.published_type else set()
    assert weight_names(saved) == weight_names(model_dir) - derived, "the saved layout differs from the input's"
    if row.published_type:
        assert json.loads((saved / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())
    reloaded = load_base(row, saved)
    batch = first_batch(recipe)
    torch.testing.assert_close(logits(reloaded, batch), logits(recipe.parts.model, batch), rtol=1e-5, atol=1e-5)


def weight_names(folder) -> set[str]:
    names = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names.update(f.keys())
    return names
