"""Padding-free batches (automodel/batch.py `FlatCollator` + `automodel_sdpa`) are exact where they are on.

For every tested architecture (a remote-code family read from its published layout): the examples of one
flattened row get the logits each gets alone (fp32, atol 1e-5),
exactly for the model types in `PADDING_FREE_VERIFIED`, and the others really do mix examples (a hybrid's Mamba
layers, for one), which is why they are padded. For every row of `LAST_LAYER_ROWS_VERIFIED`, a last layer limited to
the label rows (`LAST_LAYER_ROWS`, automodel/models/label_rows.py) gives the same hidden states there and the same
gradients, in float64 (1e-9; fp32 rounding differs by up to ~1e-3 of a gradient on this squared-sum loss), padded
and padding-free, while its attention computes fewer query rows and its MLP only the label rows. Plus: the recipe picks both by default where verified, and its run gives the per-step losses
of padded batches on transformers' sdpa.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from automodel.batch import IGNORE_INDEX, model_inputs, shift_labels
from automodel.batch import FlatCollator, pad_collate
from automodel.data.packing import build_collator, padding_free
from automodel.errors import UserError
from automodel.models import load_causal_lm
from automodel.models.attention import AUTOMODEL_SDPA, LAST_LAYER_ROWS, automodel_sdpa_by_default, use_automodel_sdpa
from automodel.models.decoder_layers import decoder_layers
from automodel.models.label_rows import install_last_layer_rows
from automodel.models.capabilities import (LAST_LAYER_ROWS_VERIFIED, PADDING_FREE_VERIFIED,
                                           POSITION_IDS_PACKING_VERIFIED, batch_layouts)
from automodel.models.registry import BY_NAME, tested_rows
from tests.models.test_architectures import one_thread  # noqa: F401 (fixture)
from tests.models.test_attention import FlashCalls
from tests.models.published import write_published_checkpoint
from tests.models.tiny import shared_tokenizer, tiny_config

ROWS = tested_rows()
LENGTHS = (23, 9, 31)
# The model_type a remote-code family's checkpoint runs as (automodel/models/families), which the lists are about.
RUNS_AS = {"LlamaForCausalLM": "llama", "GraniteForCausalLM": "granite", "StableLmForCausalLM": "stablelm",
           "GlmForCausalLM": "glm", "MistralForCausalLM": "mistral", "GPT2LMHeadModel": "jais"}


def runs_as(row) -> str:
    return row.model_type or RUNS_AS[row.loads_into]


def tiny_model(row):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = shared_tokenizer(name=row.tokenizer)
    if row.published_type:  # written in its published layout, read by automodel's loader
        with tempfile.TemporaryDirectory() as folder:
            # transformers' sdpa, which the tests switch to automodel_sdpa as the loader does by default
            model = load_causal_lm(str(write_published_checkpoint(row, Path(folder))), attn_implementation="sdpa")
        assert model.config.model_type == runs_as(row)
        return model.eval(), tokenizer
    model = AutoModelForCausalLM.from_config(tiny_config(row, tokenizer))  # transformers' choice, as the loader
    return model.eval(), tokenizer


def examples(vocab: int) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in LENGTHS]
    return [{"input_ids": ids, "labels": ids} for ids in rows]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.test_id)
def test_padding_free_rows_keep_examples_apart_exactly_where_verified(row, one_thread):
    model, tokenizer = tiny_model(row)
    if not use_automodel_sdpa(model):
        assert runs_as(row) not in PADDING_FREE_VERIFIED, f"{runs_as(row)} does not run sdpa"
        pytest.skip(f"{runs_as(row)}: runs {model.config._attn_implementation}, not through the attention interface")
    items = examples(len(tokenizer))
    with torch.no_grad():
        flat = model(**model_inputs(FlatCollator()(items)), use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([item["input_ids"]]), use_cache=False).logits[0] for item in items]
        # The CUDA default: transformers' own sdpa, told the examples by the restarting position ids only.
        model.set_attn_implementation("sdpa")
        by_position_ids = model(**model_inputs(FlatCollator(position_ids_only=True)(items)), use_cache=False).logits[0]
    same = flat.shape[0] == sum(LENGTHS) and torch.allclose(flat, torch.cat(alone), rtol=0, atol=1e-5)
    assert same == (runs_as(row) in PADDING_FREE_VERIFIED), (
        f"{runs_as(row)}: padding-free logits {'equal' if same else 'differ from'} the examples' own "
        f"(max diff {(flat - torch.cat(alone)).abs().max():.2e}); PADDING_FREE_VERIFIED must "
        f"{'list' if same else 'not list'} it")
    if not same:
        return
    apart = torch.allclose(by_position_ids, torch.cat(alone), rtol=0, atol=1e-5)
    assert apart == (runs_as(row) in POSITION_IDS_PACKING_VERIFIED), (
        f"{runs_as(row)}: rows with position ids only {'keep' if apart else 'do not keep'} the examples apart under "
        f"transformers' sdpa; POSITION_IDS_PACKING_VERIFIED must {'list' if apart else 'not list'} it")


def answer_examples(vocab: int) -> list[dict[str, list[int]]]:
    """`examples` with labels on the last 4 tokens only, as SQuAD's answers."""
    return [{"input_ids": item["input_ids"], "labels": [IGNORE_INDEX] * (len(item["labels"]) - 4) +
             item["labels"][-4:]} for item in examples(vocab)]


def label_rows_and_grads(model, batch, keep, **rows):
    """(hidden states at `keep`, gradients of their squared sum, attention query x key area, last MLP's rows)."""
    model.zero_grad(set_to_none=True)
    mlp_rows = []
    handle = decoder_layers(model)[-1].mlp.register_forward_hook(
        lambda module, args, output: mlp_rows.append(args[0].shape[:-1].numel()))
    with FlashCalls() as calls:
        hidden = model(**model_inputs(batch), use_cache=False, output_hidden_states=True, **rows).hidden_states[-1]
    handle.remove()
    hidden[keep].square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return hidden[keep].detach(), grads, sum(q * k for q, k in calls.shapes), mlp_rows


@pytest.mark.parametrize("row", [r for r in ROWS if runs_as(r) in LAST_LAYER_ROWS_VERIFIED], ids=lambda r: r.test_id)
@pytest.mark.parametrize("collate", ["padded", "padding-free"])
def test_last_layer_on_the_label_rows_only_is_exact(row, collate, one_thread):
    model, tokenizer = tiny_model(row)
    assert use_automodel_sdpa(model)
    model.double()
    items = answer_examples(len(tokenizer))
    batch = pad_collate(items, tokenizer.pad_token_id) if collate == "padded" else FlatCollator()(items)
    keep = shift_labels(batch["labels"]) != IGNORE_INDEX
    hidden, grads, area, _ = label_rows_and_grads(model, batch, keep)
    hooks = install_last_layer_rows(model)
    assert hooks is not None, f"{row.model_type}: its last layer has no per-token mlp"
    hidden_rows, grads_rows, area_rows, mlp_rows = label_rows_and_grads(model, batch, keep, **{LAST_LAYER_ROWS: keep})
    hooks.remove()
    assert torch.allclose(hidden_rows, hidden, rtol=0, atol=1e-9)
    assert grads_rows.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grads_rows[name], grad, rtol=0, atol=1e-9 * grad.abs().max()), name
    assert area_rows < area  # the last layer's attention really ran on fewer query rows
    assert mlp_rows == [int(keep.sum())]  # and its MLP on the label rows only


def flattened(requested, attention, model_type, device_type="cpu") -> bool:
    """The collator's padding-free decision for a model of this attention and type (models/capabilities.py)."""
    return padding_free(requested, batch_layouts(attention, model_type, device_type))


def test_padding_free_is_the_default_where_verified_and_refused_where_not():
    assert flattened(None, AUTOMODEL_SDPA, "llama")
    assert not flattened(None, "sdpa", "llama")
    assert not flattened(None, AUTOMODEL_SDPA, "bamba")
    assert not flattened(False, AUTOMODEL_SDPA, "llama")
    with pytest.raises(UserError, match="packed_sequence.padding_free: is not verified for model_type 'bamba'"):
        flattened(True, AUTOMODEL_SDPA, "bamba")
    with pytest.raises(UserError, match="padding_free: needs model.attn_implementation automodel_sdpa"):
        flattened(True, "eager", "llama")
    llama = batch_layouts(AUTOMODEL_SDPA, "llama")
    assert isinstance(build_collator(None, 0, llama), FlatCollator)
    assert not isinstance(build_collator(None, 0, llama, train=False), FlatCollator)
    with pytest.raises(UserError, match="choose one"):
        build_collator({"padding_free": True, "packed_sequence_size": 64}, 0, llama)


def test_cuda_runs_transformers_own_attention_with_position_ids_until_measured_there():
    """No GPU here: the decisions a CUDA run takes, on the real model and collator objects."""
    assert automodel_sdpa_by_default("cpu") and not automodel_sdpa_by_default("cuda")
    model, _ = tiny_model(BY_NAME["LlamaForCausalLM"])
    assert model.config._attn_implementation == "sdpa"  # transformers' choice
    assert not use_automodel_sdpa(model, "cuda") and model.config._attn_implementation == "sdpa"
    for attention in ("sdpa", "flash_attention_2"):
        assert flattened(None, attention, "llama", "cuda")
        cuda_llama = batch_layouts(attention, "llama", "cuda")
        assert build_collator(None, 0, cuda_llama) == FlatCollator(position_ids_only=True)
    assert not flattened(None, "sdpa", "bamba", "cuda") and not flattened(None, "eager", "llama", "cuda")
    assert flattened(None, "automodel_sdpa", "jais", "cuda") and not flattened(None, "sdpa", "jais", "cuda")
    assert not flattened(None, "sdpa", "llama", "cpu")  # on CPU, transformers' sdpa stays padded as measured
    batch = FlatCollator(position_ids_only=True)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
                                                  {"input_ids": [8, 9], "labels": [8, 9]}])
    assert sorted(model_inputs(batch)) == ["input_ids", "position_ids"]  # no mask: transformers reads the restarts
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]] and int(batch["padding_mask"].sum()) == 5
    assert use_automodel_sdpa(model, "cpu") and model.config._attn_implementation == AUTOMODEL_SDPA


def test_flat_collator_rows():
    batch = FlatCollator()([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # 8 would be predicted from the other example's 7
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "sft"])
def test_default_run_equals_the_padded_sdpa_run(tmp_path, peft):
    """stories260K on SQuAD, 4 steps of 2 micro-batches: the defaults (padding-free, automodel_sdpa with its causal
    blocks on ~500-token rows) give the per-step losses of padded batches on transformers' sdpa, rtol 1e-5."""
    from automodel.training.recipe import FinetuneRecipe
    from tests.helpers import tiny_squad_config

    losses = {}
    for name in ("default", "padded"):
        cfg = tiny_squad_config(tmp_path / name, peft=peft, max_steps=4, train_samples=32)
        cfg["dataset"]["seq_length"] = 512
        cfg["validation_dataset"]["limit_dataset_samples"] = 8
        cfg["checkpoint"]["enabled"] = False
        if name == "padded":
            cfg["model"]["attn_implementation"] = "sdpa"
            cfg["packed_sequence"] = {"padding_free": False}
        recipe = FinetuneRecipe(cfg)
        result = recipe.run()
        assert isinstance(recipe.parts.data.train_loader.collate_fn, FlatCollator) == (name == "default")
        losses[name] = (result.train_losses, result.val_losses)
    assert losses["default"][0] == pytest.approx(losses["padded"][0], rel=1e-5)
    assert losses["default"][1] == pytest.approx(losses["padded"][1], rel=1e-5)
