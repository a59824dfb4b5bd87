"""The first lines of every transformers decoder forward, shared by the families' own decoder modules."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache


def decoder_inputs(model: nn.Module, input_ids, inputs_embeds, cache, use_cache, position_ids):
    """(embeddings, cache, position ids, cached length): exactly one of input_ids and inputs_embeds, a new cache when
    one is asked for, positions continuing the cache's when none are given (as LlamaModel.forward does)."""
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(input_ids)
    if use_cache and cache is None:
        cache = DynamicCache(config=model.config)
    past = cache.get_seq_length() if cache is not None else 0
    if position_ids is None:
        position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
    return inputs_embeds, cache, position_ids, past
