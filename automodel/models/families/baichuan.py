"""Baichuan (model_type baichuan): Baichuan-7B (`BaiChuanForCausalLM`), Baichuan2-7B, Baichuan-13B and
Baichuan2-13B (all three `BaichuanForCausalLM`).

All are the Llama decoder (RMSNorm, SwiGLU, multi-head attention without biases) whose checkpoints store q, k and v
as one `self_attn.W_pack` (rows q, then k, then v; as many key/value heads as query heads, so three equal chunks),
split and re-fused by the conversion of automodel/models/families/conversions.py.

The 7B models use rotary positions (their configs name `max_position_embeddings`). The 13B models use ALiBi instead
(their configs name only `model_max_length`; Baichuan-13B's model card, Baichuan 2 technical report): no rotary,
and each head h adds a bias to its scores (score / sqrt(head_dim) + bias), with the ALiBi paper's slopes for the
head count (40 heads: the 32 slopes of 32 heads, then every other slope of 64 heads). The published code adds
`slope_h * j` for key j under its causal mask; this module adds `-slope_h * (i - j)` for query i
(automodel/models/families/alibi.py): the two differ by `slope_h * i`, a constant over each query's row, to which
softmax is invariant, so the attention is the same. The slopes are computed, never stored (the published
checkpoints carry none).

Baichuan2 adds one thing: its output head normalises each vocabulary row to unit L2 norm before the matmul
(logits = h @ normalize(W).T), in training and inference alike (Baichuan 2 technical report, "NormHead"). Its own
code normalises the stored weight in place the first time it runs in eval mode; the math is the same, and here the
stored weight is never changed, so a saved head is the trained tensor as is.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaModel,
                                                      LlamaPreTrainedModel, LlamaRMSNorm, eager_attention_forward)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from automodel.models.families.alibi import alibi_mask, alibi_slopes
from automodel.models.families.decoder_inputs import decoder_inputs
from automodel.models.families.score_masked_llama import ScoreMaskedLlamaForCausalLM

# Attention functions that add a float mask to the scores, as ALiBi needs (flash and flex attention take none).
ALIBI_ATTENTION = ("eager", "sdpa", "automodel_sdpa")


class NormHead(nn.Linear):
    """A bias-free linear layer whose weight rows are L2-normalised at every call."""

    def forward(self, hidden_states):
        return F.linear(hidden_states, F.normalize(self.weight, dim=-1))


class BaichuanLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM (its weights converted from W_pack), with Baichuan2's NormHead when
    `config.baichuan_norm_head` (set by automodel/models/families/configs.py from the published config)."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "baichuan_norm_head", False):
            self.lm_head = NormHead(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()


class BaichuanAlibiConfig(LlamaConfig):
    """LlamaConfig of the 13B models, under a model_type of its own: padding-free batching is verified for it apart
    from Llama's (automodel/models/capabilities.py), and its rotary settings are unused. No tensor-parallel plan: the
    ALiBi slopes belong to all heads, not to one rank's share."""

    model_type = "baichuan_alibi"
    base_model_tp_plan = None


def register() -> None:
    """Make `AutoConfig.for_model("baichuan_alibi")` build BaichuanAlibiConfig (idempotent; on the first load)."""
    if BaichuanAlibiConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(BaichuanAlibiConfig.model_type, BaichuanAlibiConfig)


class BaichuanAlibiAttention(LlamaAttention):
    """Llama's q/k/v/o attention without rotary: the ALiBi bias comes in the additive `attention_mask`."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = (projection(hidden_states).view(shape).transpose(1, 2)
                             for projection in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        implementation = self.config._attn_implementation
        if implementation not in ALIBI_ATTENTION:
            raise ValueError(f"model.attn_implementation {implementation!r}: Baichuan's ALiBi attention adds a bias "
                             f"to the scores; use one of {', '.join(ALIBI_ATTENTION)}")
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                    dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class BaichuanAlibiDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = BaichuanAlibiAttention(config, layer_idx)


class BaichuanAlibiModel(LlamaModel):
    """LlamaModel's embeddings, layers and final norm, with the ALiBi mask in place of rotary positions."""

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(BaichuanAlibiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs  # output_hidden_states (the chunked loss reads them) / output_attentions, as LlamaModel's
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        """`position_ids` are not read: ALiBi depends on i - j only; `cu_seq_lens_q` (in kwargs, which also carry
        it on to automodel_sdpa) separates the examples of a padding-free row."""
        inputs_embeds, cache, position_ids, past = decoder_inputs(self, input_ids, inputs_embeds, cache, use_cache,
                                                                  position_ids)
        queries = inputs_embeds.shape[1]
        slopes = alibi_slopes(self.config.num_attention_heads).to(inputs_embeds.device)
        mask = alibi_mask(slopes, queries, past + queries, attention_mask, kwargs.get("cu_seq_lens_q"),
                          inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids, cache=cache,
                                  use_cache=use_cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)


class BaichuanAlibiLlamaForCausalLM(ScoreMaskedLlamaForCausalLM):
    """Baichuan-13B / Baichuan2-13B: LlamaForCausalLM's head, loss and generation around BaichuanAlibiModel (its
    weights converted from W_pack), with Baichuan2's NormHead when `config.baichuan_norm_head`."""

    _no_split_modules = ["BaichuanAlibiDecoderLayer"]
    decoder_class = BaichuanAlibiModel

    def output_head(self, config) -> nn.Module:
        head = NormHead if getattr(config, "baichuan_norm_head", False) else nn.Linear
        return head(config.hidden_size, config.vocab_size, bias=False)
