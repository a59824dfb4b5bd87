"""`automodel_sdpa` (automodel/models/attention.py) computes transformers' `sdpa`, skipping the causal upper triangle.

fp32 throughout: loss within rtol 1e-6 and gradients within 1e-5 x the largest gradient of `sdpa`'s (the blocks
change the kernel's summation order only). The CPU flash kernel's calls are recorded to show the skipped work.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from automodel.batch import model_inputs
from automodel.batch import FlatCollator, pad_collate
from automodel.models import load_causal_lm
from automodel.models.attention import AUTOMODEL_SDPA, QUERY_BLOCK, SPLIT_MIN, automodel_sdpa_forward, register
from tests.conftest import STORIES

LONG, SHORT = 3 * QUERY_BLOCK + 17, QUERY_BLOCK + 5  # several query blocks, and fewer than two (one SDPA call)


def tiny(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    register()
    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def padded_batch(lengths, vocab: int = 256):
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    return pad_collate([{"input_ids": r, "labels": r} for r in rows], 0), rows


def loss_and_grads(model, implementation: str, batch):
    model.set_attn_implementation(implementation)
    model.zero_grad(set_to_none=True)
    loss = model(**model_inputs(batch), labels=batch["labels"], use_cache=False).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


class FlashCalls(TorchDispatchMode):
    """(query length, key length) of every CPU flash-attention forward call, and whether it had a mask."""

    def __init__(self):
        super().__init__()
        self.shapes, self.masked = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.shapes.append((args[0].shape[0] * args[0].shape[2], args[1].shape[2]))
            self.masked.append((kwargs or {}).get("attn_mask") is not None)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model_type,overrides", [("llama", {}), ("mistral", {"sliding_window": 100})],
                         ids=["llama-gqa", "mistral-sliding-window"])
def test_same_loss_and_gradients_as_sdpa_on_padded_long_rows(model_type, overrides):
    model = tiny(model_type, **overrides)
    batch, _ = padded_batch([LONG, LONG - 150, SHORT])
    want_loss, want = loss_and_grads(model, "sdpa", batch)
    loss, got = loss_and_grads(model, AUTOMODEL_SDPA, batch)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, rtol=0, atol=1e-5 * grad.abs().max()), name


def test_the_upper_triangle_of_a_masked_row_is_skipped():
    """A padded batch gets a mask, so `sdpa` computes each row's whole square; the blocks skip its upper triangle."""
    model = tiny("llama").eval()
    batch, _ = padded_batch([LONG, LONG - 40])
    area = {}
    for implementation in ("sdpa", AUTOMODEL_SDPA):
        model.set_attn_implementation(implementation)
        with torch.no_grad(), FlashCalls() as calls:
            model(**model_inputs(batch), use_cache=False)
        area[implementation] = sum(q * k for q, k in calls.shapes)
    blocks = -(-LONG // QUERY_BLOCK)
    # Block i of n sees i of n key blocks: (n + 1) / 2n of the square.
    assert area[AUTOMODEL_SDPA] / area["sdpa"] == pytest.approx((blocks + 1) / (2 * blocks), rel=0.05)


@pytest.mark.parametrize("model_type,overrides", [("llama", {}), ("mistral", {"sliding_window": 100})],
                         ids=["llama-gqa", "mistral-sliding-window"])
def test_padding_free_long_examples_equal_each_example_alone(model_type, overrides):
    """Each example of a flattened row attends to itself only (batched by length, `padding_free_causal`);
    sliding-window layers hand the attention a mask over the whole row, of which each example uses its diagonal
    block (in query blocks)."""
    model = tiny(model_type, **overrides).eval()
    model.set_attn_implementation(AUTOMODEL_SDPA)
    _, rows = padded_batch([LONG, 40, 2 * QUERY_BLOCK + 1])  # a last block of one query row, too
    with torch.no_grad():
        flat = model(**model_inputs(FlatCollator()([{"input_ids": r, "labels": r} for r in rows])),
                     use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r]), use_cache=False).logits[0] for r in rows])
    assert torch.allclose(flat, alone, rtol=0, atol=1e-5)


def test_a_mask_that_sees_later_keys_is_computed_whole():
    """A prefix-LM style mask (a query sees a later key) is not causal: no block skipping, the same output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = (torch.randn(1, 4, 2 * QUERY_BLOCK + 3, 8) for _ in range(3))
    length = query.shape[2]
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    mask[:, :10] = True  # the first 10 tokens are a bidirectional prefix
    module = torch.nn.Module()
    want, _ = sdpa_attention_forward(module, query, key, value, mask[None, None])
    got, _ = automodel_sdpa_forward(module, query, key, value, mask[None, None])
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


def test_the_loader_picks_it_where_transformers_picks_sdpa_and_saves_a_plain_config(tmp_path):
    model = load_causal_lm(str(STORIES))
    assert model.config._attn_implementation == AUTOMODEL_SDPA
    assert load_causal_lm(str(STORIES), attn_implementation="sdpa").config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert not [key for key in json.loads((tmp_path / "config.json").read_text()) if "attn" in key]
    # A fresh interpreter that never imported automodel loads it with plain transformers.
    code = ("from transformers import AutoModelForCausalLM; import sys; "
            "print(AutoModelForCausalLM.from_pretrained(sys.argv[1]).config._attn_implementation)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "sdpa"


def test_unmasked_examples_are_causal_calls_without_masks():
    """No mask (a padding-free row): an example shorter than `SPLIT_MIN` is one `is_causal` call; a longer one
    (padded by one token to an even length) is its two half triangles in one call and a rectangle; no masks."""
    model = tiny("llama").eval()
    model.set_attn_implementation(AUTOMODEL_SDPA)
    short = 2 * QUERY_BLOCK + 1
    _, rows = padded_batch([LONG, short])
    assert short < SPLIT_MIN <= LONG and LONG % 2 == 1
    with torch.no_grad(), FlashCalls() as calls:
        model(**model_inputs(FlatCollator()([{"input_ids": r, "labels": r} for r in rows])), use_cache=False)
    half = (LONG + 1) // 2
    per_layer = [(short, short), (2 * half, half), (half, half)]  # (batch x queries, keys)
    assert sorted(calls.shapes) == sorted(per_layer * model.config.num_hidden_layers)
    assert not any(calls.masked)
