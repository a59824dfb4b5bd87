"""The tiny model each row of the supported-models table (automodel/models/registry.py) is tested with: test
fixtures, not part of the table.

2 layers, hidden 64, few heads and experts; the vocabulary and special tokens come from the row's tokenizer.
`TINY` holds each row's own fields (under the family's own names for remote-code rows, which are written in their
published layout by tests/models/published.py); `tiny_overrides` adds the shape every native row shares.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from automodel.models.registry import ARCHITECTURES, Architecture

# The shape every tiny test model shares; rows override what their architecture names differently.
TINY_BASE: dict[str, Any] = {
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True,
}
# Few experts, top-2, so a handful of batches routes tokens to every expert.
TINY_MOE: dict[str, Any] = {"moe_intermediate_size": 32, "num_experts_per_tok": 2}
# Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): rotary runs over qk_rope_head_dim, which is head_dim.
MLA = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
           v_head_dim=16, head_dim=8)

# architecture -> the config fields its tiny model sets beyond (or instead of) TINY_BASE.
TINY: dict[str, dict[str, Any]] = {
    "AquilaForCausalLM": dict(tie_word_embeddings=False),
    "BaiChuanForCausalLM": dict(tie_word_embeddings=False, num_key_value_heads=None),
    "BambaForCausalLM": dict(
        attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=32),
    "ChatGLMModel / ChatGLMForConditionalGeneration": dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, kv_channels=16,
        multi_query_attention=True, multi_query_group_num=2, seq_length=256, layernorm_epsilon=1e-5,
        rmsnorm=True, add_bias_linear=False, add_qkv_bias=True, apply_query_key_layer_scaling=True,
        apply_residual_connection_post_layernorm=False, attention_softmax_in_fp32=True, bias_dropout_fusion=True,
        fp32_residual_connection=False, original_rope=True, post_layer_norm=True, hidden_dropout=0.0,
        attention_dropout=0.0, rope_ratio=1, tie_word_embeddings=False),
    "CohereForCausalLM": {},
    "Cohere2ForCausalLM": dict(sliding_window=16),
    "DeciLMForCausalLM": dict(
        num_hidden_layers=3, intermediate_size=None, num_key_value_heads=None, tie_word_embeddings=False,
        block_configs=[{"attention": {"no_op": False, "n_heads_in_group": 2, "replace_with_linear": False},
                        "ffn": {"no_op": True, "ffn_mult": None, "replace_with_linear": False}},
                       {"attention": {"no_op": True, "n_heads_in_group": None, "replace_with_linear": False},
                        "ffn": {"no_op": False, "ffn_mult": 7.0, "replace_with_linear": False}},
                       {"attention": {"no_op": False, "n_heads_in_group": 4, "replace_with_linear": False},
                        "ffn": {"no_op": False, "ffn_mult": 1.0, "replace_with_linear": False}}]),
    "DeepseekForCausalLM": dict(tie_word_embeddings=False),
    "DeepseekV2ForCausalLM": dict(**MLA, **TINY_MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1),
    "DeepseekV3ForCausalLM": dict(
        **MLA, **TINY_MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
        topk_group=1),
    "ExaoneForCausalLM": {},
    "Exaone4ForCausalLM": dict(sliding_window=16, sliding_window_pattern=2),
    "FalconForCausalLM": {},
    "GemmaForCausalLM": dict(head_dim=16),
    "Gemma2ForCausalLM": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
    "Gemma3ForCausalLM": dict(
        head_dim=16, query_pre_attn_scalar=16,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "GlmForCausalLM": dict(head_dim=16),
    "Glm4ForCausalLM": dict(head_dim=16),
    "GPTBigCodeForCausalLM": {},
    "GPTJForCausalLM": dict(rotary_dim=8, tie_word_embeddings=False),
    "GPTNeoXForCausalLM": {},
    "GraniteForCausalLM": {},
    "GraniteMoeForCausalLM": dict(num_local_experts=4, **TINY_MOE),
    "GraniteMoeSharedForCausalLM": dict(num_local_experts=4, shared_intermediate_size=64, **TINY_MOE),
    "GritLM": {},
    "InternLMForCausalLM": dict(tie_word_embeddings=False, bias=True, rotary={"base": 10000, "type": "dynamic"}),
    "InternLM2ForCausalLM": dict(
        tie_word_embeddings=False, bias=False, rope_theta=1000000.0,
        rope_scaling={"type": "dynamic", "factor": 2.0}),
    "InternLM3ForCausalLM": dict(head_dim=16),
    "JAISLMHeadModel": dict(
        n_embd=64, n_head=4, n_layer=2, n_inner=96, n_positions=256, activation_function="swiglu",
        position_embedding_type="alibi", embeddings_scale=14.6, width_scale=0.0625, scale_qk_dot_by_d=True,
        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False),
    "LlamaForCausalLM": {},
    "MiniCPMForCausalLM": dict(scale_emb=12, dim_model_base=16, scale_depth=1.4),
    "MiniCPM3ForCausalLM": dict(**MLA),
    "MistralForCausalLM": {},
    "MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
    "NemotronForCausalLM": dict(head_dim=16),
    "OLMoForCausalLM": {},
    "OLMo2ForCausalLM": {},
    "OLMoEForCausalLM": dict(
        num_experts=4, intermediate_size=32,
        num_experts_per_tok=2),
    "OrionForCausalLM": dict(tie_word_embeddings=False),
    "PhiForCausalLM": {},
    "Phi3ForCausalLM": {},
    "Phi3SmallForCausalLM": dict(
        num_hidden_layers=2, hidden_size=64, ff_intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, hidden_act="gegelu", gegelu_limit=0.5,
        gegelu_pad_to_256=True, ff_dim_multiplier=None, blocksparse_homo_head_pattern=False,
        blocksparse_block_size=4, blocksparse_num_local_blocks=2, blocksparse_vert_stride=3,
        blocksparse_triton_kernel_block_size=4, dense_attention_every_n_layers=2, embedding_dropout_prob=0.1,
        attention_dropout_prob=0.0, ffn_dropout_prob=0.1, layer_norm_epsilon=1e-5, mup_use_scaling=True,
        mup_width_multiplier=8.0, mup_embedding_multiplier=10.0, mup_attn_multiplier=1.0,
        rope_embedding_base=1000000, rope_position_scale=1.0, rope_scaling=None, reorder_and_upcast_attn=False,
        pad_sequence_to_multiple_of_64=True, initializer_range=0.02),
    "Qwen2ForCausalLM": {},
    "Qwen2MoeForCausalLM": dict(num_experts=4, shared_expert_intermediate_size=64, **TINY_MOE),
    "Qwen3ForCausalLM": dict(head_dim=16),
    "Qwen3MoeForCausalLM": dict(head_dim=16, num_experts=4, **TINY_MOE),
    "StableLmForCausalLM": {},
    "Starcoder2ForCausalLM": {},
    "SolarForCausalLM": dict(
        num_hidden_layers=6, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, sliding_window=16, bskcn_1=[1, 3], bskcn_2=[2], bskcn_3=[2, 5], bskcn_4=[4],
        bskcn_tv=[0.9, 0.8]),
}
assert set(TINY) == {row.architecture for row in ARCHITECTURES}


@dataclasses.dataclass(frozen=True)
class Variant(Architecture):
    """A row whose tiny model sets more fields: a published variant of the family (tests/models/published.py
    `VARIANTS`) or a test's own settings."""

    more: dict[str, Any] = dataclasses.field(default_factory=dict)


def variant(row: Architecture, **more) -> Variant:
    """`row` with `more` tiny-config fields on top of its own (and of a variant's)."""
    fields = {field.name: getattr(row, field.name) for field in dataclasses.fields(Architecture)}
    return Variant(**fields, more={**(row.more if isinstance(row, Variant) else {}), **more})


def tiny_fields(row: Architecture) -> dict[str, Any]:
    """The row's own tiny-config fields (a variant's included), under the names its config.json uses."""
    return {**TINY[row.architecture], **(row.more if isinstance(row, Variant) else {})}


def tiny_overrides(row: Architecture) -> dict[str, Any]:
    """Config overrides of the row's tiny model (vocabulary and special tokens come from the tokenizer)."""
    return {**TINY_BASE, **tiny_fields(row)}
