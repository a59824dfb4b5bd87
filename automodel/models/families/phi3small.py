"""Phi-3-Small (`Phi3SmallForCausalLM`, model_type phi3small): a small native module on top of LlamaForCausalLM.

What differs from Llama (Phi-3 technical report, arXiv 2404.14219, and the field descriptions of the published
configuration_phi3_small.py; docs/supported_models.md):
- q, k and v are one biased `self_attn.query_key_value` projection, head-major: for each key/value head, its
  query heads, then its key head, then its value head (head_dim rows each); the output projection `dense` is biased;
- block-sparse attention on every layer i with (i + 1) % `dense_attention_every_n_layers` != 0, dense causal
  attention on the others. The sparse layout works on blocks of `blocksparse_block_size` positions: a query in
  block qb sees a causally earlier key in block kb when qb - kb < `blocksparse_num_local_blocks` (the local
  window) or when (kb + 1 + h x step) % `blocksparse_vert_stride` == 0 (the vertical stripes), where step is
  0 with `blocksparse_homo_head_pattern` and max(1, vert_stride // heads) otherwise, so that query head h's stripes
  are shifted by h x step blocks. Here the layout is an exact boolean mask over the dense score matrix (the
  published code computes only the kept blocks with a Triton kernel: same result, more compute here);
- the softmax scale is `mup_attn_multiplier / head_dim` (muP) with `mup_use_scaling`, 1/sqrt(head_dim) without;
- the MLP is `up_proj` (2 x intermediate rows, biased, gate and linear parts interleaved), gegelu (the gate clamped
  above at `gegelu_limit`, the linear part to +-limit; quick_gelu(gate) x (linear + 1)), biased `down_proj`;
- LayerNorm with bias (`layer_norm_epsilon`) everywhere, `model.final_layernorm` at the end;
- embeddings x `mup_embedding_multiplier`, logits / `mup_width_multiplier` (done here to the last hidden state:
  lm_head has no bias, so it is the same product), lm_head tied to the embeddings;
- dropout on the embeddings (`embedding_dropout_prob`, before the multiplier) and on the MLP output
  (`ffn_dropout_prob`) in training, as the published code applies them;
- rotary of base `rope_embedding_base`; the 128k checkpoints' LongRoPE (`rope_scaling` type "su") divides each
  frequency by its short factor while the sequence fits in `original_max_position_embeddings` and by its long
  factor beyond, and scales cos/sin (Phi3SmallRotaryEmbedding). The published code picks the regime by the
  sequence length it sees, which in training it pads to a multiple of 64: the same regime for an original length
  that is a multiple of 64 (8192 in the published checkpoints).
Weight names are the published ones, so loading and saving need no conversion.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaModel,
                                                      LlamaPreTrainedModel, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb,
                                                      eager_attention_forward)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from automodel.models.families.decoder_inputs import decoder_inputs
from automodel.models.families.score_masked_llama import ScoreMaskedLlamaForCausalLM

# Attention functions that take the mask as a tensor over the score matrix (the block-sparse layout needs one).
MASKED_ATTENTION = ("eager", "sdpa", "automodel_sdpa")


def gegelu(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Phi-3-Small's gated GELU over interleaved (gate, linear) pairs; infinities pass the clamp unchanged."""
    gate, linear = x[..., ::2], x[..., 1::2]
    if limit is not None:
        gate = torch.where(torch.isinf(gate), gate, gate.clamp(max=limit))
        linear = torch.where(torch.isinf(linear), linear, linear.clamp(min=-limit, max=limit))
    return gate * torch.sigmoid(1.702 * gate) * (linear + 1)


def head_sliding_step(config) -> int:
    """How many blocks each query head's vertical stripes are shifted from the previous head's."""
    if config.blocksparse_homo_head_pattern:
        return 0
    return max(1, config.blocksparse_vert_stride // config.num_attention_heads)


def block_sparse_layout(config, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """(batch, heads, queries, keys) bool: which keys the layout lets each query see (causality is the caller's).
    Positions are within each sequence (they restart at 0 for every example of a padding-free row)."""
    size = config.blocksparse_block_size
    query_block = (query_positions // size)[:, None, :, None]
    key_block = (key_positions // size)[:, None, None, :]
    heads = torch.arange(config.num_attention_heads, device=query_positions.device)[None, :, None, None]
    local = query_block - key_block < config.blocksparse_num_local_blocks
    vertical = (key_block + 1 + heads * head_sliding_step(config)) % config.blocksparse_vert_stride == 0
    return local | vertical


class Phi3SmallAttention(LlamaAttention):
    """Grouped-query attention from one head-major `query_key_value`; `block_sparse` layers get the sparse mask."""

    def __init__(self, config, layer_idx: int):
        nn.Module.__init__(self)
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // heads
        self.num_key_value_groups = heads // kv_heads
        self.scaling = config.attention_scale
        self.attention_dropout = config.attention_dropout
        every = config.dense_attention_every_n_layers
        self.block_sparse = not (every and (layer_idx + 1) % every == 0)
        self.query_key_value = nn.Linear(config.hidden_size, (heads + 2 * kv_heads) * self.head_dim)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, sparse_mask=None,
                **kwargs):
        batch, length = hidden_states.shape[:2]
        groups = self.query_key_value(hidden_states).view(batch, length, -1, self.num_key_value_groups + 2,
                                                          self.head_dim)
        query = groups[:, :, :, :-2].reshape(batch, length, -1, self.head_dim).transpose(1, 2)
        key, value = (groups[:, :, :, i].transpose(1, 2) for i in (-2, -1))
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        implementation = self.config._attn_implementation
        if self.block_sparse:
            if implementation not in MASKED_ATTENTION:
                raise ValueError(f"model.attn_implementation {implementation!r}: Phi-3-Small's block-sparse layers "
                                 f"need a mask over the scores; use one of {', '.join(MASKED_ATTENTION)}")
            attention_mask = sparse_mask
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                    dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return self.dense(output.reshape(batch, length, -1).contiguous()), weights


class Phi3SmallMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.limit = config.gegelu_limit
        self.up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.ffn_dropout_prob)

    def forward(self, x):
        return self.dropout(self.down_proj(gegelu(self.up_proj(x), self.limit)))


class Phi3SmallDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm residual layer (its forward) around Phi-3-Small's attention, MLP and biased LayerNorms."""

    def __init__(self, config, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = Phi3SmallAttention(config, layer_idx)
        self.mlp = Phi3SmallMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


def sparse_attention_mask(config, dense_mask, query_positions, key_positions, query_count: int, key_count: int):
    """The block-sparse layers' mask: the dense layers' one (padding, packing, causality; None means plain causal)
    with the block-sparse layout removed from it, in the dense mask's kind (bool, or additive float for eager).
    A query row the layout would leave with no key at all (a padding row) keeps the dense row, so it stays finite."""
    device = query_positions.device
    if dense_mask is None:
        offset = key_count - query_count
        allowed = torch.ones(query_count, key_count, dtype=torch.bool, device=device).tril(offset)[None, None]
    elif dense_mask.dtype == torch.bool:
        allowed = dense_mask
    else:
        allowed = dense_mask == 0
    sparse = allowed & block_sparse_layout(config, query_positions, key_positions)
    sparse = torch.where(sparse.any(-1, keepdim=True), sparse, allowed)
    if dense_mask is None or dense_mask.dtype == torch.bool:
        return sparse
    return torch.zeros_like(sparse, dtype=dense_mask.dtype).masked_fill(~sparse, torch.finfo(dense_mask.dtype).min)


def key_positions(attention_mask, position_ids, key_count: int) -> torch.Tensor:
    """Each key's position within its sequence: the queries' own without a cache; with one, counted along the 2D
    padding mask (left padding) or from 0."""
    if key_count == position_ids.shape[-1]:
        return position_ids
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == key_count:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.arange(key_count, device=position_ids.device).expand(position_ids.shape[0], -1)


class Phi3SmallRotaryEmbedding(LlamaRotaryEmbedding):
    """transformers' rotary for the config's `rope_parameters`: plain (8k checkpoints) or "longrope" (128k: the
    short factors while the longest position + 1 is at most original_max_position_embeddings, the long ones beyond,
    as the published code picks them by the sequence length). transformers' longrope scales cos/sin by one
    attention factor in both regimes; a 128k config that gives each regime its own (`short_mscale`,
    `long_mscale`: the native config's `longrope_mscales`) gets that regime's scale here, picked by the same test."""

    def forward(self, x, position_ids):
        mscales = getattr(self.config, "longrope_mscales", None)
        if mscales is not None:
            longest = position_ids.max() + 1
            long = longest > self.config.rope_parameters["original_max_position_embeddings"]
            self.attention_scaling = torch.where(long, mscales[1], mscales[0])  # a tensor: no host sync
        return super().forward(x, position_ids)


class Phi3SmallModel(LlamaModel):
    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.ModuleList(Phi3SmallDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = Phi3SmallRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs  # output_hidden_states / output_attentions, as LlamaModel's forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        inputs_embeds, cache, position_ids, past = decoder_inputs(self, input_ids, inputs_embeds, cache, use_cache,
                                                                  position_ids)
        position_ids = position_ids.expand(inputs_embeds.shape[0], -1)
        dense_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        cache=cache, position_ids=position_ids)
        queries, keys = inputs_embeds.shape[1], past + inputs_embeds.shape[1]
        sparse_mask = None
        if any(layer.self_attn.block_sparse for layer in self.layers):
            sparse_mask = sparse_attention_mask(self.config, dense_mask, position_ids,
                                                key_positions(attention_mask, position_ids, keys), queries, keys)
        hidden_states = self.embedding_dropout(inputs_embeds) * self.config.mup_embedding_multiplier
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=dense_mask, sparse_mask=sparse_mask,
                                  position_embeddings=position_embeddings, position_ids=position_ids, cache=cache,
                                  use_cache=use_cache, **kwargs)
        hidden_states = self.final_layernorm(hidden_states) / self.config.mup_width_multiplier
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class Phi3SmallLlamaForCausalLM(ScoreMaskedLlamaForCausalLM):
    """LlamaForCausalLM (its head, loss and generation) around Phi3SmallModel, whose block-sparse layers pass a
    mask over the scores; lm_head is tied to the embeddings."""

    _no_split_modules = ["Phi3SmallDecoderLayer"]
    decoder_class = Phi3SmallModel
