"""`automodel_sdpa`: PyTorch's SDPA with causal block skipping on CPU and padding-free (flattened) batches.

Registered through transformers' own `AttentionInterface` and `AttentionMaskInterface` (no patching), so every
architecture whose modeling code calls the interface uses it; `load_causal_lm` switches a model that transformers
gave `sdpa` to it. What it adds to transformers' `sdpa_attention_forward` (which it calls for the masked math):

- Causal block skipping (CPU). PyTorch's CPU flash kernel walks keys in blocks of 512, so a row of up to 512
  tokens computes (then masks) the whole square, `is_causal` or not.
  - Without a mask (an unpadded batch, the examples of a padding-free row), `causal_attention` (below) gives the
    kernel two half triangles and a rectangle instead: 3/4 of the square for rows of at least `SPLIT_MIN` tokens,
    one `is_causal` call for shorter rows.
  - Where a mask is given (padded batches, sliding windows), the queries go in blocks of `QUERY_BLOCK`, block
    [a, b) seeing only the keys [0, b): (n + 1) / 2n of the square for n blocks. (Without a mask these blocks are
    no faster than one `is_causal` call, and their masks would be saved for the backward; measurements in
    docs/guides/llm/performance.md.)
  CUDA kernels skip masked blocks themselves, so nothing changes there. (On CUDA, `automodel_sdpa` is not the
  default: `automodel_sdpa_by_default` below says why.)
- Padding-free batches. A flattened micro-batch (one row, examples back to back, `cu_seq_lens_q` the example
  boundaries, transformers' names for them) attends example by example: no [tokens x tokens] block-diagonal mask
  is built. Without a mask, examples of similar length run as one batch (`padding_free_causal`, at most 10% of
  padded scores); with one (sliding windows), each example gets its diagonal block of it.

- Only the rows the loss reads, in the last layer: given `LAST_LAYER_ROWS` (a bool batch x seq mask passed through
  the model's forward as a keyword), the last layer's attention computes those query rows alone and leaves zeros
  elsewhere (automodel/models/label_rows.py says why that is exact).

The softmax of every computed query row sees exactly the keys `sdpa` would let it see, so results equal `sdpa` up
to float rounding (tests/models/test_attention.py).

The CPU kernels it calls, in the second half of this file: causal self-attention without most of the upper
triangle, and padding-free examples batched by length. PyTorch's CPU flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`) walks the keys in blocks of 512, so an `is_causal` call of up to
512 tokens computes the whole [L x L] square of scores, forward and backward, then zeroes its upper half. `causal_attention` splits a causal triangle of L >= SPLIT_MIN tokens into the triangles of
its two halves (one kernel call: the halves are a batch twice as large) and the rectangle of the second half's
queries against the first half's keys (one call, not causal): 3/4 of the square, recursively for longer rows.
The second half's rows merge their two partial results through their log-sum-exps, as flash attention merges key
blocks. The backward runs the kernel's own backward on each piece, given the merged output and log-sum-exp: a
piece's gradients need nothing else of the other pieces, so they sum to the whole triangle's, exactly.

SPLIT_MIN = 384 keeps each half at >= 192 queries, where the kernel works in 64-row query blocks; below that it
uses 32-row blocks, which cost more per score than the triangle saves. The kernel timings and the end-to-end
gain are in docs/guides/llm/performance.md.

`padding_free_causal` runs the examples of a padding-free row (no mask) in groups of similar length: a group is
one batch, right-padded to its longest example (with copies of each example's last token, which only the padding
rows see, and whose outputs are dropped), as long as that adds at most `PAD_TOLERANCE` of the group's scores.
One batched call per group instead of one call per example: fewer, larger kernel calls.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

AUTOMODEL_SDPA = "automodel_sdpa"
# The forward keyword that carries the positions whose last-layer output is read (see the module docstring).
LAST_LAYER_ROWS = "automodel_last_layer_rows"
# Query rows per block: small enough to skip most of a 512-token triangle, large enough to keep the kernel efficient.
QUERY_BLOCK = 128
# Causal rows at least this long are split into half triangles and a rectangle (module docstring).
SPLIT_MIN = 384
# A group of examples pads to its longest as long as the padding adds at most this share of its attention scores.
PAD_TOLERANCE = 0.1


def register() -> None:
    """Make `automodel_sdpa` a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(AUTOMODEL_SDPA, automodel_sdpa_forward)
    # The same masks as `sdpa`: None for plain causal rows, a 4D mask for padding, sliding windows or packing.
    AttentionMaskInterface.register(AUTOMODEL_SDPA, sdpa_mask)


def automodel_sdpa_by_default(device_type: str) -> bool:
    """Whether a model transformers gave `sdpa` runs `automodel_sdpa` when `model.attn_implementation` is unset.

    On CPU, yes: that is where it is measured (docs/guides/llm/performance.md). On CUDA, no, until
    benchmarks/gpu_peers.py has run on a GPU: nothing of it is measured there, and its padding-free path would run
    one SDPA call per example; CUDA runs transformers' own attention, with padding-free batches marked by restarting
    position ids (automodel/data/packing.py), which flash-attention reads as varlen and SDPA as a block-diagonal
    mask."""
    return device_type == "cpu"


def training_device_type() -> str:
    """The device type a run trains on: CUDA where there is one (automodel/distributed/env.py `pick_device`)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def use_automodel_sdpa(model, device_type: str | None = None) -> bool:
    """Switch a model that transformers loaded with `sdpa` to `automodel_sdpa` where that is the default for
    `device_type` (the training device when None); True when it did."""
    if model.config._attn_implementation != "sdpa" or not model._can_set_attn_implementation():
        return False
    if not automodel_sdpa_by_default(device_type or training_device_type()):
        return False
    register()
    model.set_attn_implementation(AUTOMODEL_SDPA)
    return True


def automodel_sdpa_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, cu_seq_lens_q: torch.Tensor | None = None,
                           automodel_last_layer_rows: torch.Tensor | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, seq, head_dim) in, (batch, seq, heads, head_dim)
    out. `cu_seq_lens_q` (a padding-free batch) splits the single row into its examples; `automodel_last_layer_rows`
    (`LAST_LAYER_ROWS`) limits the last layer to the rows the loss reads."""
    query, key, value = same_dtype(query, key, value)
    kwargs.pop("cu_seq_lens_k", None)
    kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    if automodel_last_layer_rows is not None and _is_last_layer(module) and query.shape[2] == key.shape[2] and (
            attention_mask is None or attention_mask.dtype == torch.bool):
        return _last_layer_rows_only(module, query, key, value, attention_mask, automodel_last_layer_rows,
                                     cu_seq_lens_q, **kwargs), None
    if cu_seq_lens_q is None:
        if _plain_causal(module, query, key, value, attention_mask, kwargs) and query.shape[2] >= SPLIT_MIN:
            from transformers.integrations.sdpa_attention import repeat_kv

            groups = query.shape[1] // key.shape[1]
            output = causal_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), kwargs.get("scaling"))
            return output.transpose(1, 2).contiguous(), None
        return _causal_blocks(module, query, key, value, attention_mask, **kwargs), None
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(f"a padding-free batch is one row of examples without a KV cache; got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}")
    bounds = cu_seq_lens_q.tolist()
    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if _plain_causal(module, query, key, value, attention_mask, kwargs):
        return padding_free_causal(query, key, value, sizes, kwargs.get("scaling")), None
    outputs = []
    # split, not one slice per example: the backward of a split is one concatenation, while each slice's backward
    # fills a zero tensor the size of the whole row.
    for start, q, k, v in zip(bounds, query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)):
        # The diagonal block of a mask over the flattened row is the example's own (causal, sliding window) mask.
        end = start + q.shape[2]
        mask = None if attention_mask is None else attention_mask[..., start:end, start:end]
        outputs.append(_causal_blocks(module, q, k, v, mask, **kwargs))
    return torch.cat(outputs, dim=1), None


def same_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """Query, key and value in the dtype SDPA would compute in. Under autocast with float32 weights the rotary
    embedding leaves query and key in float32 while value comes from its projection in bf16; autocast casts SDPA's
    inputs to its dtype, and the kernels called here directly need the same."""
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
        torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (query, key, value))


def _plain_causal(module, query, key, value, attention_mask, kwargs) -> bool:
    """Whether `sdpa` would compute plain causal self-attention here, which `causal_attention` computes faster on
    CPU: no mask, a causal module, and nothing `sdpa` adds on top (dropout, a position bias; it refuses
    soft-capping); and whether the CPU kernel takes it: keys as long as the queries, one head size for queries, keys
    and values (multi-head latent attention differs)."""
    return (attention_mask is None and kwargs.get("is_causal", getattr(module, "is_causal", True))
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and kwargs.get("dropout", 0.0) == 0.0 and query.device.type == "cpu" and query.shape[2] == key.shape[2]
            and query.shape[-1] == key.shape[-1] == value.shape[-1])


def _causal_blocks(module, query, key, value, attention_mask, **kwargs) -> torch.Tensor:
    """SDPA over query blocks [a, b) against keys [0, b) for masked CPU causal self-attention; one SDPA call
    otherwise. Without a mask that one call is `is_causal`, which costs no more than the blocks (module docstring)
    and saves no block masks for the backward."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    length = query.shape[2]
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if (attention_mask is None or attention_mask.dtype != torch.bool or query.device.type != "cpu" or not causal
            or length != key.shape[2] or length < 2 * QUERY_BLOCK):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
    positions = torch.arange(length, device=query.device)
    if (attention_mask & (positions.unsqueeze(0) > positions.unsqueeze(1))).any():
        # A query sees a later key (a prefix-LM mask): the blocks would drop it, so no skipping.
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
    kwargs["is_causal"] = False  # each block gets its slice of the mask
    # Grouped-query attention: repeat the key/value heads once here, not once per block inside SDPA's wrapper.
    groups = getattr(module, "num_key_value_groups", 1)
    key, value, module = repeat_kv(key, groups), repeat_kv(value, groups), _HeadsRepeated(module)
    outputs = []
    for start in range(0, length, QUERY_BLOCK):
        end = min(length, start + QUERY_BLOCK)
        outputs.append(sdpa_attention_forward(module, query[:, :, start:end], key[:, :, :end], value[:, :, :end],
                                              attention_mask[..., start:end, :end], **kwargs)[0])
    return torch.cat(outputs, dim=1)


class _HeadsRepeated:
    """An attention module as `sdpa_attention_forward` sees it once its keys and values have one head per query
    head (it reads `num_key_value_groups` and `is_causal` only)."""

    num_key_value_groups = 1

    def __init__(self, module):
        self.is_causal = getattr(module, "is_causal", True)


def _is_last_layer(module) -> bool:
    config = getattr(module, "config", None)
    return config is not None and getattr(module, "layer_idx", None) == config.num_hidden_layers - 1


def _last_layer_rows_only(module, query, key, value, attention_mask, rows: torch.Tensor,
                      cu_seq_lens_q: torch.Tensor | None, **kwargs) -> torch.Tensor:
    """Attention for the query positions `rows` (bool, batch x seq) only, zeros at the others. Each picked query
    sees the keys up to itself (and, in a padding-free row, of its own example), as far as `attention_mask` allows."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    output = query.new_zeros(batch, length, heads, value.shape[-1])
    positions = torch.arange(length, device=query.device)
    example = None if cu_seq_lens_q is None else torch.bucketize(positions, cu_seq_lens_q[1:].to(positions), right=True)
    kwargs["is_causal"] = False
    for b in range(batch):
        picked = rows[b].nonzero().squeeze(1)
        if picked.numel() == 0:
            continue
        end = int(picked[-1]) + 1  # no picked query sees a later key
        mask = positions[:end].unsqueeze(0) <= picked.unsqueeze(1)
        if example is not None:
            mask &= example[:end].unsqueeze(0) == example[picked].unsqueeze(1)
        mask = mask[None, None] if attention_mask is None else mask & attention_mask[b:b + 1, :, picked, :end]
        output[b, picked] = sdpa_attention_forward(module, query[b:b + 1, :, picked], key[b:b + 1, :, :end],
                                                   value[b:b + 1, :, :end], mask, **kwargs)[0][0]
    return output


# ---- the CPU causal kernels ----------------------------------------------------------------------------------

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Causal attention of (batch, heads, seq, head_dim) tensors, key and value with as many heads as the query;
    returns (batch, heads, seq, head_dim) like SDPA."""
    return _CausalAttention.apply(_token_major(query), _token_major(key), _token_major(value), scale)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale):
        out, lse = _forward(query, key, value, scale)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = _backward(_token_major(grad_out), *ctx.saved_tensors, ctx.scale)
        return (*grads, None)


def _forward(q, k, v, scale):
    length = q.shape[2]
    if length < SPLIT_MIN:
        return _flash(q, k, v, 0.0, True, scale=scale)[:2]
    top = (length + 1) // 2
    if length % 2 == 0:  # both triangles in one call; the kernel's token-major output un-halves as a view
        out, lse = (_unhalves(t) for t in _forward(_halves(q), _halves(k), _halves(v), scale))
    else:
        batch, heads, _, dim = q.shape
        out = q.new_empty(batch, length, heads, dim).transpose(1, 2)
        lse = q.new_empty(batch, length, heads, dtype=_lse_dtype(q)).transpose(1, 2)
        for rows in (slice(0, top), slice(top, length)):
            out[:, :, rows], lse[:, :, rows] = _forward(q[:, :, rows], k[:, :, rows], v[:, :, rows], scale)
    out_rect, lse_rect = _flash(q[:, :, top:], k[:, :, :top], v[:, :, :top], 0.0, False, scale=scale)[:2]
    _merge(out[:, :, top:], lse[:, :, top:], out_rect, lse_rect)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, scale):
    length = q.shape[2]
    if length < SPLIT_MIN:
        return _flash_backward(grad_out, q, k, v, out, lse, 0.0, True, scale=scale)
    top = (length + 1) // 2
    if length % 2 == 0:
        grads = _backward(*(_halves(t) for t in (grad_out, q, k, v, out, lse)), scale)
        grad_q, grad_k, grad_v = (_unhalves(g) for g in grads)
    else:
        first, second = (_backward(*(t[:, :, rows] for t in (grad_out, q, k, v, out, lse)), scale)
                         for rows in (slice(0, top), slice(top, length)))
        grad_q, grad_k, grad_v = (torch.cat(pair, dim=2) for pair in zip(first, second))
    rows, keys = slice(top, length), slice(0, top)
    rect_q, rect_k, rect_v = _flash_backward(grad_out[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys],
                                             out[:, :, rows], lse[:, :, rows], 0.0, False, scale=scale)
    grad_q[:, :, rows] += rect_q
    grad_k[:, :, keys] += rect_k
    grad_v[:, :, keys] += rect_v
    return grad_q, grad_k, grad_v


def _merge(out, lse, other_out, other_lse) -> None:
    """Fold a second partial softmax over other keys into (out, lse), in place."""
    merged = torch.logaddexp(lse, other_lse)
    out.mul_(torch.exp(lse - merged).unsqueeze(-1)).add_(other_out * torch.exp(other_lse - merged).unsqueeze(-1))
    lse.copy_(merged)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, ...) with the memory laid out (batch, seq, heads, ...), which makes `_halves` a view."""
    return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


def _halves(t: torch.Tensor) -> torch.Tensor:
    """(batch, heads, 2w, ...) -> (2 batch, heads, w, ...): the first and second half of each row as rows of their
    own. A view for token-major tensors (the halves of a row are consecutive in memory)."""
    return t.unflatten(2, (2, t.shape[2] // 2)).transpose(1, 2).flatten(0, 1)


def _unhalves(t: torch.Tensor) -> torch.Tensor:
    """The inverse of `_halves`; a view for token-major tensors, which is how the kernel returns its results."""
    return t.unflatten(0, (t.shape[0] // 2, 2)).transpose(1, 2).flatten(2, 3)


# Padding-free rows: examples grouped by length.

@dataclass(frozen=True)
class _Group:
    examples: int
    length: int  # padded
    query_index: torch.Tensor  # the (token, head) row of each padded query position
    key_index: torch.Tensor  # the (token, key/value head) row of each padded key position, heads repeated
    padding: torch.Tensor  # bool (examples, 1, length, 1): True past an example's end


@dataclass(frozen=True)
class _Plan:
    groups: tuple[_Group, ...]
    order: torch.Tensor  # for each token of the row, its position in the groups' concatenated output


def padding_free_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sizes: list[int],
                        scale: float | None = None) -> torch.Tensor:
    """Causal attention of each example of a padding-free row on its own: query (1, heads, tokens, head_dim), key
    and value (1, kv_heads, tokens, head_dim), `sizes` the examples' lengths in order. Returns (1, tokens, heads,
    head_dim), transformers' attention output layout."""
    plan = _plan(tuple(sizes), query.device, query.shape[1] // key.shape[1], key.shape[1])
    rows = [t[0].transpose(0, 1).reshape(-1, t.shape[-1]) for t in (query, key, value)]  # (tokens x heads, dim)
    return _PaddingFreeCausal.apply(*rows, plan, scale).unsqueeze(0)


class _PaddingFreeCausal(torch.autograd.Function):
    """`causal_attention` of each group of examples, gathered from (tokens x heads, head_dim) rows: one gather pads
    a group to a batch and, for grouped-query attention, repeats each key/value head for its query heads.

    Saved for the backward: the rows and the unpadded output, which the output projection saves anyway (the same
    tensor), not the gathered copies (with grouped-query attention twice the keys' and values' size or more) nor
    the padded output. The backward gathers again; the padding rows' output gradient is zero, so their outputs
    (gathered copies of another row's) do not matter."""

    @staticmethod
    def forward(ctx, query_rows, key_rows, value_rows, plan, scale):
        outputs, lses = [], []
        for group in plan.groups:
            out, lse = _forward(*_gather(query_rows, key_rows, value_rows, group), scale)
            outputs.append(out.transpose(1, 2).flatten(0, 1))  # (examples x length, heads, head_dim), a view
            lses.append(lse)
        output = (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).index_select(0, plan.order)
        ctx.save_for_backward(query_rows, key_rows, value_rows, output, *lses)
        ctx.plan, ctx.scale = plan, scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query_rows, key_rows, value_rows, output, *lses = ctx.saved_tensors
        grads = [torch.zeros_like(rows) for rows in (query_rows, key_rows, value_rows)]
        dim = output.shape[-1]
        for group, lse in zip(ctx.plan.groups, lses):
            out, grad_out = (rows.reshape(-1, dim).index_select(0, group.query_index)
                             .view(group.examples, group.length, -1, dim).transpose(1, 2)
                             for rows in (output, grad_output))
            grad_out.masked_fill_(group.padding, 0)
            pieces = _backward(grad_out, *_gather(query_rows, key_rows, value_rows, group), out, lse, ctx.scale)
            for grad, piece, index in zip(grads, pieces, (group.query_index, group.key_index, group.key_index)):
                grad.index_add_(0, index, piece.transpose(1, 2).reshape(-1, dim))
        return (*grads, None, None)


def _gather(query_rows, key_rows, value_rows, group: _Group):
    """(batch, heads, length, head_dim) token-major views of a group's gathered rows."""
    return (rows.index_select(0, index).view(group.examples, group.length, -1, rows.shape[-1]).transpose(1, 2)
            for rows, index in ((query_rows, group.query_index), (key_rows, group.key_index),
                                (value_rows, group.key_index)))


def padded_length(length: int) -> int:
    """The length a group of examples at most `length` long is padded to: a multiple of 2 for each halving that
    `causal_attention` will make, so that every split is even (one call for both triangles)."""
    multiple, rest = 1, length
    while rest >= SPLIT_MIN:
        rest, multiple = (rest + 1) // 2, multiple * 2
    return -(-length // multiple) * multiple


def group_examples(sizes: tuple[int, ...]) -> list[list[int]]:
    """Example indices grouped longest first: an example joins the current group while padding everyone to the
    group's padded length adds at most `PAD_TOLERANCE` of the group's scores."""
    found: list[list[int]] = []
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if found:
            group = found[-1] + [index]
            scores = sum(sizes[i] ** 2 for i in group)
            if len(group) * padded_length(sizes[group[0]]) ** 2 <= (1 + PAD_TOLERANCE) * scores:
                found[-1] = group
                continue
        found.append([index])
    return found


# Every layer of a step reads the same plan; the next step has another layout, so older plans are only memory.
@functools.lru_cache(maxsize=2)
def _plan(sizes: tuple[int, ...], device: torch.device, groups: int, kv_heads: int) -> _Plan:
    """The gather indices of `padding_free_causal` for one row layout."""
    starts = [0, *itertools.accumulate(sizes)]
    # key/value head of each query head: repeat_kv's order
    heads = torch.arange(kv_heads, device=device).repeat_interleave(groups)
    plan, placed, offset = [], [None] * len(sizes), 0
    for group in group_examples(sizes):
        length = padded_length(sizes[group[0]])
        positions = torch.arange(length, device=device)
        first = torch.tensor([starts[i] for i in group], device=device)[:, None]
        ends = torch.tensor([sizes[i] for i in group], device=device)[:, None]
        # each padded position reads its example's token, the padding its example's last token
        tokens = (first + torch.minimum(positions, ends - 1)).flatten()
        for slot, example in enumerate(group):
            placed[example] = offset + slot * length + positions[:sizes[example]]
        offset += len(group) * length
        plan.append(_Group(len(group), length,
                           (tokens[:, None] * len(heads) + torch.arange(len(heads), device=device)).flatten(),
                           (tokens[:, None] * kv_heads + heads).flatten(), (positions >= ends)[:, None, :, None]))
    return _Plan(tuple(plan), torch.cat(placed))
