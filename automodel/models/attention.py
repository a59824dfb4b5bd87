"""`automodel_sdpa`: PyTorch's SDPA with causal block skipping on CPU and padding-free (flattened) batches.

Registered through transformers' own `AttentionInterface` and `AttentionMaskInterface` (no patching), so every
architecture whose modeling code calls the interface uses it; `load_causal_lm` switches a model that transformers
gave `sdpa` to it. What it adds to transformers' `sdpa_attention_forward` (which it calls for the masked math):

- Causal block skipping (CPU). PyTorch's CPU flash kernel walks keys in blocks of 512, so a row of up to 512
  tokens computes (then masks) the whole square, `is_causal` or not.
  - Without a mask (an unpadded batch, the examples of a padding-free row), `causal_attention`
    (automodel/models/causal_attention.py) gives the kernel two half triangles and a rectangle instead: 3/4 of
    the square for rows of at least `SPLIT_MIN` tokens, one `is_causal` call for shorter rows.
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
  elsewhere (automodel/models/last_layer_rows.py says why that is exact).

The softmax of every computed query row sees exactly the keys `sdpa` would let it see, so results equal `sdpa` up
to float rounding (tests/models/test_attention.py).
"""

from __future__ import annotations

import torch

from automodel.models.causal_attention import SPLIT_MIN, causal_attention, padding_free_causal, supported

AUTOMODEL_SDPA = "automodel_sdpa"
# The forward keyword that carries the positions whose last-layer output is read (see the module docstring).
LAST_LAYER_ROWS = "automodel_last_layer_rows"
# Query rows per block: small enough to skip most of a 512-token triangle, large enough to keep the kernel efficient.
QUERY_BLOCK = 128


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
    soft-capping)."""
    return (attention_mask is None and kwargs.get("is_causal", getattr(module, "is_causal", True))
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and supported(query, key, value, kwargs.get("dropout", 0.0)))


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
