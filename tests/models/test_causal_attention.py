"""automodel/models/attention.py's CPU kernels: causal attention as the CPU flash kernel's pieces (two half
triangles and a rectangle), and the examples of a padding-free row batched by length.

Against PyTorch's SDPA (`is_causal`, one call per example) in fp64: outputs and the gradients of query, key and
value within 1e-10 (the pieces change the summation order only); on a model in fp32, loss within rtol 1e-6 and
gradients within 1e-5 x the largest gradient, as in test_attention.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from automodel.batch import FlatCollator, pad_collate
from automodel.models.attention import (AUTOMODEL_SDPA, PAD_TOLERANCE, SPLIT_MIN, causal_attention, group_examples,
                                        padded_length, padding_free_causal)
from tests.models.test_attention import FlashCalls, loss_and_grads, padded_batch, tiny


def qkv(total: int, heads: int, kv_heads: int, dim: int = 8, dtype=torch.float64, seed: int = 0):
    """Query, key, value and an output gradient in the models' layout: (1, heads, tokens, dim) views of
    (1, tokens, heads, dim) memory."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, total, h, dim, dtype=dtype, generator=generator).transpose(1, 2).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    return q, k, v, torch.randn(1, total, heads, dim, dtype=dtype, generator=generator)


def each_example_alone(q, k, v, sizes, scale=None):
    outputs = [F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale, enable_gqa=True)
               for a, b, c in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2))]
    return torch.cat(outputs, 2).transpose(1, 2)


@pytest.mark.parametrize("sizes,heads,kv_heads,scale", [
    ([505, 489, 499, 489, 493, 509, 505, 506], 8, 4, None),  # stories260K's SQuAD rows: one group, split once
    ([SPLIT_MIN - 1, SPLIT_MIN, SPLIT_MIN + 1, 1, 40, 2 * SPLIT_MIN + 3], 4, 4, 0.3),  # odd, tiny, split twice
    ([218, 208, 212, 346, 341], 8, 2, None),  # two groups, none split
], ids=["stories-rows", "edges", "two-groups"])
def test_a_padding_free_row_equals_each_example_alone(sizes, heads, kv_heads, scale):
    q, k, v, grad = qkv(sum(sizes), heads, kv_heads)
    want = each_example_alone(q, k, v, sizes, scale)
    got = padding_free_causal(q, k, v, sizes, scale)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    for mine, theirs in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("length", [SPLIT_MIN, 2 * SPLIT_MIN + 1, 4 * SPLIT_MIN])
def test_a_batch_equals_sdpa(length):
    """The direct path (a batch of equal-length rows): even and odd splits, and halves split again."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, length, 16, dtype=torch.float64, generator=generator).requires_grad_()
               for _ in range(3))
    grad = torch.randn(2, 4, length, 16, dtype=torch.float64, generator=generator)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = causal_attention(q, k, v)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    for mine, theirs in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-10)


def test_bfloat16_stays_within_its_rounding():
    sizes = [500, 450]
    q, k, v, _ = qkv(sum(sizes), 4, 2, dtype=torch.float32)
    want = each_example_alone(q, k, v, sizes)
    got = padding_free_causal(*(t.detach().bfloat16() for t in (q, k, v)), sizes)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 2e-2


def test_a_long_triangle_computes_three_quarters_of_the_square():
    """One 512-token example: the kernel sees two 256-token triangles (a batch of two) and one 256 x 256 rectangle,
    no mask, instead of the 512 x 512 square that `is_causal` computes."""
    q, k, v, _ = qkv(512, 4, 4, dtype=torch.float32)
    with torch.no_grad(), FlashCalls() as calls:
        padding_free_causal(q, k, v, [512])
    assert sorted(calls.shapes) == [(256, 256), (2 * 256, 256)]  # (batch x queries, keys)
    assert not any(calls.masked)


def test_examples_are_grouped_by_length_within_the_padding_tolerance():
    sizes = (218, 505, 208, 489, 346, 212, 341, 3)
    groups = group_examples(sizes)
    assert sorted(i for group in groups for i in group) == list(range(len(sizes)))
    assert groups == [[1, 3], [4, 6], [0, 5, 2], [7]]
    for group in groups:
        padded = len(group) * padded_length(sizes[group[0]]) ** 2
        assert padded <= (1 + PAD_TOLERANCE) * sum(sizes[i] ** 2 for i in group)
    assert padded_length(SPLIT_MIN - 1) == SPLIT_MIN - 1  # no split: no padding
    assert padded_length(SPLIT_MIN + 1) == SPLIT_MIN + 2  # one split: even
    assert padded_length(2 * SPLIT_MIN + 1) == 2 * SPLIT_MIN + 4  # two splits: a multiple of 4


def test_a_model_on_a_padding_free_row_has_the_padded_batchs_loss_and_gradients():
    """Llama with grouped-query attention, examples long enough to split, one too short: the padding-free row
    through `automodel_sdpa` against the padded batch through transformers' `sdpa`."""
    model = tiny("llama")
    _, rows = padded_batch([SPLIT_MIN + 66, SPLIT_MIN + 7, 100])
    examples = [{"input_ids": r, "labels": r} for r in rows]
    want_loss, want = loss_and_grads(model, "sdpa", pad_collate(examples, 0))
    loss, got = loss_and_grads(model, AUTOMODEL_SDPA, FlatCollator()(examples))
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, rtol=0, atol=1e-5 * grad.abs().max()), name


def test_the_backward_keeps_the_rows_and_the_output_not_padded_copies():
    """Saved for the backward: the query, key and value rows and the unpadded output (which the output projection
    keeps anyway), plus one log-sum-exp per position and head; no padded or head-repeated copy."""
    sizes = [500, 450, 100]
    q, k, v, _ = qkv(sum(sizes), 8, 2, dtype=torch.float32)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = padding_free_causal(q, k, v, sizes)
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, out)}
    assert inputs <= set(saved)
    padded_positions = sum(padded_length(sizes[g[0]]) * len(g) for g in group_examples(tuple(sizes)))
    others = sum(n for ptr, n in saved.items() if ptr not in inputs)
    assert others <= padded_positions * 8 * 4  # float32 log-sum-exps, 8 heads
