"""DeciLM / Nemotron-NAS (`DeciLMForCausalLM`, model_type nemotron-nas): a Llama decoder whose layers differ.

Its config's `block_configs` holds one entry per layer: `attention` {no_op, n_heads_in_group, ...} and `ffn`
{no_op, ffn_mult, ...}. A no_op attention layer has neither attention nor its input norm (the hidden state passes
through), a no_op FFN layer neither MLP nor its post-attention norm; otherwise the layer has
num_attention_heads / n_heads_in_group key/value heads and an MLP of width `ffn_width(ffn_mult, hidden)`.
Weight names are Llama's, minus the absent modules. No transformers class has per-layer shapes, so this is a
small native module on top of LlamaForCausalLM: only the decoder layers differ.
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


def ffn_width(ffn_mult: float, hidden: int) -> int:
    """DeciLM's MLP width: 2/3 of ffn_mult x hidden (SwiGLU's usual 2/3), rounded up to a multiple of 256."""
    width = int(2 * ffn_mult * hidden / 3)
    return -(-width // 256) * 256


class LayerConfig:
    """The model's config with a few per-layer values. Everything else is read from the model's config when asked,
    so a later change there (set_attn_implementation switching the attention function) reaches every layer; a
    copy taken at init would keep the old one."""

    def __init__(self, config, **overrides):
        self.__dict__.update(overrides, _model_config=config)

    def __getattr__(self, name):
        return getattr(self.__dict__["_model_config"], name)


class DeciLMDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose attention and/or MLP may be absent, with its own KV heads and MLP width."""

    def __init__(self, config, layer_idx: int):
        block = config.block_configs[layer_idx]
        overrides = {"num_key_value_heads": config.num_attention_heads // (block["attention"].get("n_heads_in_group")
                                                                          or 1)}
        if not block["ffn"].get("no_op"):
            overrides["intermediate_size"] = ffn_width(block["ffn"]["ffn_mult"], config.hidden_size)
        super().__init__(LayerConfig(config, **overrides), layer_idx)
        self.attention_no_op = bool(block["attention"].get("no_op"))
        self.ffn_no_op = bool(block["ffn"].get("no_op"))
        if self.attention_no_op:
            del self.self_attn, self.input_layernorm
        if self.ffn_no_op:
            del self.mlp, self.post_attention_layernorm

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if not self.attention_no_op:
            attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                         attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                         use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
            hidden_states = hidden_states + attended
        if not self.ffn_no_op:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with DeciLMDecoderLayer layers (config.block_configs, one per layer)."""

    def __init__(self, config):
        super().__init__(config)
        self.model.layers = nn.ModuleList(DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()
