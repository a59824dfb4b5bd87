"""Jais (`JAISLMHeadModel`, model_type jais): GPT-2's layout and pre-norm LayerNorm blocks, with
- a SwiGLU MLP: `c_proj(c_fc(x) * silu(c_fc2(x)))` (`activation_function` "swiglu");
- ALiBi instead of position embeddings (`position_embedding_type` "alibi"): head h adds `-slope_h * (i - j)` to
  the score of query i and key j, with the ALiBi paper's slopes (`transformer.relative_pe.slopes`, stored in the
  checkpoints, kept as a buffer so they load and save unchanged);
- muP scalings: embeddings x `embeddings_scale`, logits x `width_scale`, and attention scores / head_dim
  (`scale_qk_dot_by_d`) instead of / sqrt(head_dim).
Weights keep GPT-2's names and Conv1D layout (transformer.wte, transformer.h.N.{ln_1, attn.c_attn, attn.c_proj,
ln_2, mlp.c_fc, mlp.c_fc2, mlp.c_proj}, transformer.ln_f; lm_head tied to wte).

ALiBi (automodel/models/families/alibi.py, shared with Baichuan-13B) depends on i - j only, so the row index works
for right or left padding alike; a padding-free row (examples back to back, `cu_seq_lens_q` their boundaries) keeps
each example's queries on its own keys. The bias goes to PyTorch's SDPA as an additive mask, so this attention does
not go through transformers' attention interface.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block, GPT2PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils.output_capturing import capture_outputs

from automodel.models.families.alibi import alibi_mask, alibi_slopes


class JaisConfig(GPT2Config):
    """GPT2Config plus Jais's scalings (read from the published fields by configs.jais)."""

    model_type = "jais"

    def __init__(self, embeddings_scale: float = 1.0, output_logits_scale: float = 1.0,
                 attention_scale_power: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.embeddings_scale = embeddings_scale
        self.output_logits_scale = output_logits_scale
        self.attention_scale_power = attention_scale_power


def register() -> None:
    """Make `AutoConfig.for_model("jais")` build JaisConfig (idempotent; on the first load, not at import)."""
    if "jais" not in CONFIG_MAPPING:
        AutoConfig.register("jais", JaisConfig)


class AlibiSlopes(nn.Module):
    """Holds `slopes` under the published name `relative_pe.slopes` (never trained)."""

    def __init__(self, heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(heads))


def init_slopes(module: nn.Module, heads: int) -> None:
    """A checkpoint without the slopes gets the paper's (transformers initialises what a checkpoint lacks)."""
    if isinstance(module, AlibiSlopes):
        with torch.no_grad():
            module.slopes.copy_(alibi_slopes(heads))


class JaisAttention(GPT2Attention):
    """GPT-2's fused c_attn / c_proj self-attention scored by 1 / head_dim^attention_scale_power plus the ALiBi
    mask, computed by PyTorch's SDPA."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx=layer_idx)
        self.scaling = self.head_dim ** -config.attention_scale_power

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        query, key, value = (t.view(*t.shape[:-1], -1, self.head_dim).transpose(1, 2)
                             for t in self.c_attn(hidden_states).split(self.split_size, dim=2))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attended = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask.to(query.dtype),
            dropout_p=self.attn_dropout.p if self.training else 0.0, scale=self.scaling)
        attended = attended.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.resid_dropout(self.c_proj(attended)), None


class JaisMLP(nn.Module):
    """SwiGLU in GPT-2's Conv1D layout: `c_proj(c_fc(x) * silu(c_fc2(x)))`."""

    def __init__(self, inner: int, config):
        super().__init__()
        self.c_fc = Conv1D(inner, config.hidden_size)
        self.c_fc2 = Conv1D(inner, config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, inner)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states):
        gated = self.c_fc(hidden_states) * nn.functional.silu(self.c_fc2(hidden_states))
        return self.dropout(self.c_proj(gated))


class JaisBlock(GPT2Block):
    """GPT-2's pre-norm block with JaisAttention and JaisMLP."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx=layer_idx)
        self.attn = JaisAttention(config, layer_idx)
        self.mlp = JaisMLP(config.n_inner or 4 * config.hidden_size, config)


class JaisModel(GPT2PreTrainedModel):
    """Embeddings x embeddings_scale (no position embeddings: ALiBi), Jais blocks, final LayerNorm."""

    config_class = JaisConfig

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(JaisBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.relative_pe = AlibiSlopes(config.num_attention_heads)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        init_slopes(module, self.config.num_attention_heads)

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    @capture_outputs  # output_hidden_states, which the chunked loss reads (automodel/training/loss.py)
    def forward(self, input_ids=None, cache=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                use_cache=None, cu_seq_lens_q=None, **kwargs) -> BaseModelOutputWithPast:
        """`position_ids` are not read: ALiBi depends on i - j only, and `cu_seq_lens_q` separates the examples
        of a padding-free row."""
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        queries = inputs_embeds.shape[1]
        keys = queries + (cache.get_seq_length() if cache is not None else 0)
        mask = alibi_mask(self.relative_pe.slopes, queries, keys, attention_mask, cu_seq_lens_q, inputs_embeds.dtype)
        hidden_states = self.drop(inputs_embeds * self.config.embeddings_scale)
        for block in self.h:
            hidden_states = block(hidden_states, cache, mask, use_cache=use_cache)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden_states), cache=cache if use_cache else None)


class JaisGPT2LMHeadModel(GPT2LMHeadModel):
    """JaisModel under GPT-2's LM head, the logits times `output_logits_scale` (the published `width_scale`)."""

    config_class = JaisConfig

    def __init__(self, config):
        super().__init__(config)
        self.transformer = JaisModel(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        init_slopes(module, self.config.num_attention_heads)

    def forward(self, input_ids=None, cache=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        out = self.transformer(input_ids, cache=cache, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               use_cache=use_cache, cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
                               output_hidden_states=kwargs.get("output_hidden_states"))
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        logits = logits * self.config.output_logits_scale
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)
