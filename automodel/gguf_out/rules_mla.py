"""llama.cpp's conversion rules for DeepSeek-V2 and -V3 (multi-head latent attention, MoE): convert_hf_to_gguf.py's
DeepseekV2Model. llama.cpp runs MLA as multi-query attention over the compressed KV (one KV head of
kv_lora_rank + qk_rope_head_dim) and absorbs `kv_b_proj` into the queries and outputs, so the converter writes it as
its two halves, `k_b` (transposed per head) and `v_b`; the rope part of each head is rotated in interleaved pairs,
as llama.cpp's deepseek2 does, so no rows are permuted."""

from __future__ import annotations

import re
from typing import Any

from automodel.gguf_out.hparams import Piece, hparam, rope_parameters, text_model_parameters
from automodel.gguf_out.rules_moe import split_experts

KV_B = re.compile(r"(?P<layer>model\.layers\.\d+)\.self_attn\.kv_b_proj\.weight")
SCORE_BIAS = re.compile(r"(?P<layer>model\.layers\.\d+)\.mlp\.gate\.e_score_correction_bias")


def split_deepseek(name: str, shape: tuple[int, ...], config: dict[str, Any]) -> list[Piece] | None:
    """DeepseekV2Model.modify_tensors: kv_b_proj as k_b [heads, kv_lora_rank, qk_nope] and v_b [heads, v_head,
    kv_lora_rank]; V3's router score bias under the converter's name; the fused experts as split_experts cuts
    them."""
    if match := KV_B.fullmatch(name):
        heads, nope, value = config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
        rank = shape[-1]

        def k_b(t):
            return t.view(heads, nope + value, rank)[:, :nope].transpose(1, 2)

        def v_b(t):
            return t.view(heads, nope + value, rank)[:, nope:]

        return [(f"{match['layer']}.self_attn.k_b_proj.weight", (heads, rank, nope), k_b),
                (f"{match['layer']}.self_attn.v_b_proj.weight", (heads, value, rank), v_b)]
    if match := SCORE_BIAS.fullmatch(name):
        return [(f"{match['layer']}.mlp.gate.e_score_correction.bias", shape, lambda t: t)]
    return split_experts(name, shape, config)


def deepseek_check(config: dict[str, Any]) -> str | None:
    if not config.get("rope_interleave", True):
        return "rope_interleave=False (llama.cpp's deepseek2 rotates interleaved pairs)"
    return None


def deepseek2_parameters(writer, config: dict[str, Any], sigmoid_gating: bool) -> None:
    """DeepseekV2Model.set_gguf_parameters (MLA as one KV head; the key and value lengths are MLA's)."""
    import gguf

    text_model_parameters(writer, {**{key: value for key, value in config.items() if key != "head_dim"},
                                   "num_key_value_heads": 1, "rms_norm_eps": config.get("rms_norm_eps") or 1e-6})
    moe = config.get("n_routed_experts") is not None
    first_dense = config.get("first_k_dense_replace")
    writer.add_leading_dense_block_count(first_dense if first_dense is not None else
                                         (0 if moe else config["num_hidden_layers"]))
    rank = config.get("kv_lora_rank") or 512
    writer.add_vocab_size(config["vocab_size"])
    if config.get("q_lora_rank") is not None:
        writer.add_q_lora_rank(config["q_lora_rank"])
    writer.add_kv_lora_rank(rank)
    writer.add_key_length(rank + config["qk_rope_head_dim"])
    writer.add_value_length(rank)
    writer.add_key_length_mla(config["qk_nope_head_dim"] + config["qk_rope_head_dim"])
    writer.add_value_length_mla(config["v_head_dim"])
    writer.add_expert_feed_forward_length(hparam(config, "moe_intermediate_size", "intermediate_size"))
    if moe:
        writer.add_expert_count(config["n_routed_experts"])
    writer.add_expert_shared_count(config.get("n_shared_experts") or 0)
    if config.get("routed_scaling_factor") is not None:
        writer.add_expert_weights_scale(config["routed_scaling_factor"])
    if config.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    if config.get("n_group") is not None:
        writer.add_expert_group_count(config["n_group"])
    if config.get("topk_group") is not None:
        writer.add_expert_group_used_count(config["topk_group"])
    # transformers' DeepSeek-V3 always routes by sigmoid scores (its config has no scoring_func); llama.cpp reads a
    # missing gating function as V2's softmax
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid_gating
                                  else gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_rope_dimension_count(config["qk_rope_head_dim"])
    yarn_parameters(writer, config)


def yarn_parameters(writer, config: dict[str, Any]) -> None:
    """TextModel.set_gguf_parameters' YaRN branch, and DeepseekV2Model's attention-scale factor (0.1 x
    mscale_all_dim, which llama.cpp's deepseek2 turns into the softmax scale transformers applies)."""
    import gguf

    rope = rope_parameters(config)
    if rope["rope_type"] != "yarn":
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if rope.get("extrapolation_factor") is not None:
        writer.add_rope_scaling_yarn_ext_factor(rope["extrapolation_factor"])
    if (attention_factor := hparam(rope, "attention_factor", "attn_factor")) is not None:
        writer.add_rope_scaling_yarn_attn_factor(attention_factor)
    if rope.get("beta_fast") is not None:
        writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    if rope.get("beta_slow") is not None:
        writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    if rope.get("mscale_all_dim") is not None:
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def deepseek_v2_parameters(writer, config: dict[str, Any]) -> None:
    deepseek2_parameters(writer, config, sigmoid_gating=False)


def deepseek_v3_parameters(writer, config: dict[str, Any]) -> None:
    deepseek2_parameters(writer, config, sigmoid_gating=True)


def minicpm3_check(config: dict[str, Any]) -> str | None:
    """llama.cpp's minicpm3 graph hard-codes the published muP scales."""
    published = {"scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256}
    for key, value in published.items():
        if config.get(key, value) != value:
            return f"{key}={config[key]!r} (llama.cpp's minicpm3 hard-codes {value})"
    return None


def minicpm3_parameters(writer, config: dict[str, Any]) -> None:
    """MiniCPM3Model.set_gguf_parameters (without LongRoPE's factor tensors: that rope type stops in rules_for)."""
    text_model_parameters(writer, {key: value for key, value in config.items() if key != "head_dim"})
    writer.add_vocab_size(config["vocab_size"])
    if config.get("q_lora_rank") is not None:
        writer.add_q_lora_rank(config["q_lora_rank"])
    writer.add_kv_lora_rank(config["kv_lora_rank"])
    writer.add_key_length(config["qk_nope_head_dim"] + config["qk_rope_head_dim"])
    writer.add_rope_dimension_count(config["qk_rope_head_dim"])
