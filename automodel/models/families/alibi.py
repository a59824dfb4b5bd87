"""ALiBi (Press et al. 2022, "Train Short, Test Long"), shared by the families that use it in place of position
embeddings: Jais (jais.py) and Baichuan-13B / Baichuan2-13B (baichuan.py).

Head h adds `-slope_h * (i - j)` to the score of query i and key j. Implementations differ in the row constant:
Baichuan's published code adds `slope_h * j` (the key's position) instead, which differs from `-slope_h * (i - j)`
by `slope_h * i`, the same for every key of query i; softmax is invariant to adding a constant to a row, so the
two give the same attention. Depending on i - j only, the bias is the same for right or left padding, and in a
padding-free row (examples back to back) each example's queries see only their own keys, at their own distances.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes: for 2^k heads the geometric sequence starting at 2^(-8/2^k); otherwise those of
    the nearest smaller power of two, then every other slope of the next power of two."""
    def powers_of_two(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    below = 2 ** math.floor(math.log2(heads))
    slopes = powers_of_two(below) + powers_of_two(2 * below)[0::2][: heads - below]
    return torch.tensor(slopes).unsqueeze(-1)  # (heads, 1), the shape of Jais's stored buffer


def alibi_mask(slopes: torch.Tensor, queries: int, keys: int, attention_mask, cu_seq_lens_q,
               dtype: torch.dtype) -> torch.Tensor:
    """The additive (batch, heads, queries, keys) mask: ALiBi where a query may see a key, -inf elsewhere.
    Queries are the last `queries` of `keys` positions (a cache holds the others). `attention_mask` is the 2D
    (batch, keys) padding mask (0 on padding) or a 4D boolean (batch, 1, queries, keys) mask of which keys each
    query may see (automodel/data/packing.py's packed rows); `cu_seq_lens_q` the example boundaries of a
    padding-free row."""
    device = slopes.device
    query_at = torch.arange(keys - queries, keys, device=device)[:, None]
    distance = query_at - torch.arange(keys, device=device)[None, :]
    allowed = (distance >= 0)[None, None]
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = allowed & attention_mask[..., -queries:, -keys:].bool()
    elif attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    if cu_seq_lens_q is not None:  # a padding-free row: each example sees its own keys only
        lengths = cu_seq_lens_q.diff()
        example = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths.to(device))
        allowed = allowed & (example[-queries:, None] == example[None, :])[None, None]
    # A query that may see nothing (a padding row) sees everything: finite values nobody reads, not NaN.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    bias = (-slopes.float()[:, :, None] * distance.clamp(min=0)).to(dtype)[None]
    return bias.masked_fill(~allowed, float("-inf"))
