"""llama.cpp's conversion rules for the Llama-shaped dense decoders beyond Llama itself (convert_hf_to_gguf.py's
conversion/ classes named in each function): which hparams each graph reads, and the tensor changes."""

from __future__ import annotations

import math
from typing import Any

import torch

from automodel.gguf_out.hparams import (
    head_dim, hparam, llama_tensor, rope_dims, rope_parameters, sliding_window_parameters, text_model_parameters,
)


def llama_parameters(writer, config: dict[str, Any]) -> None:
    """LlamaModel.set_gguf_parameters (also InternLM3Model's)."""
    text_model_parameters(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(rope_dims(config))


def phi3_parameters(writer, config: dict[str, Any]) -> None:
    """Phi3MiniModel.set_gguf_parameters, and LongRoPE's attention factor (its generate_extra_tensors; the factor
    tensors: architectures.extra_tensors)."""
    text_model_parameters(writer, config)
    writer.add_rope_dimension_count(rope_dims(config))
    rope = rope_parameters(config)
    writer.add_rope_scaling_orig_ctx_len(hparam(rope, "original_max_position_embeddings", default=hparam(
        config, "original_max_position_embeddings", "max_position_embeddings")))
    writer.add_sliding_window(config.get("sliding_window") or 0)
    if rope["rope_type"] == "longrope":
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(config))


def longrope_attention_factor(config: dict[str, Any]) -> float:
    """transformers' _compute_longrope_parameters: `attention_factor`, else sqrt(1 + log(factor) / log(original
    context)) with `factor`, else the context ratio (Phi3MiniModel always takes the ratio, which the published
    configs' missing `factor` makes the same)."""
    rope = rope_parameters(config)
    original = rope["original_max_position_embeddings"]
    if rope.get("attention_factor") is not None:
        return rope["attention_factor"]
    factor = rope.get("factor") or config["max_position_embeddings"] / original
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0


def stablelm_parameters(writer, config: dict[str, Any]) -> None:
    """StableLMModel.set_gguf_parameters."""
    text_model_parameters(writer, config)
    writer.add_rope_dimension_count(rope_dims(config))
    writer.add_parallel_residual(config.get("use_parallel_residual", True))


def query_scale_check(config: dict[str, Any]) -> str | None:
    """llama.cpp's Gemma 2 and 3 graphs scale queries by 1/sqrt(head_dim) (hidden/heads for the 46- and 62-layer
    27B models) rather than reading `query_pre_attn_scalar`: another value would be run wrongly."""
    scalar = config.get("query_pre_attn_scalar")
    n_layer = config["num_hidden_layers"]
    used = (config["hidden_size"] // config["num_attention_heads"] if n_layer in (46, 62) else config["head_dim"])
    if scalar is not None and scalar != used:
        return f"query_pre_attn_scalar={scalar} (llama.cpp scales queries by {used} for this shape)"
    return None


def gemma2_parameters(writer, config: dict[str, Any]) -> None:
    """Gemma2Model.set_gguf_parameters."""
    text_model_parameters(writer, config)
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    sliding_window_parameters(writer, config)


def gemma3_check(config: dict[str, Any]) -> str | None:
    if config.get("attn_logit_softcapping") is not None:  # Gemma3Model asserts it away; the graph has none
        return f"attn_logit_softcapping={config['attn_logit_softcapping']} (llama.cpp's gemma3 has no attention " \
               "soft-capping)"
    return query_scale_check(config)


def gemma3_parameters(writer, config: dict[str, Any]) -> None:
    """Gemma3Model.set_gguf_parameters: rope base of the global layers, and of the sliding ones."""
    text_model_parameters(writer, config)
    sliding_rope = (config.get("rope_parameters") or {}).get("sliding_attention", {})
    if sliding_rope.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(sliding_rope["rope_theta"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    sliding_window_parameters(writer, config)


def olmo_parameters(writer, config: dict[str, Any]) -> None:
    """OlmoModel.set_gguf_parameters: OLMo's norms are non-parametric LayerNorms with eps 1e-5."""
    text_model_parameters(writer, config)
    writer.add_layer_norm_eps(1e-5)
    if config.get("clip_qkv") is not None:
        writer.add_clamp_kqv(config["clip_qkv"])


def olmo_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """OlmoModel.modify_tensors: LlamaModel's permutation of the Q/K weights."""
    return llama_tensor(name, tensor, config) if name.endswith(".weight") else tensor


def olmo2_parameters(writer, config: dict[str, Any]) -> None:
    """Olmo2Model.set_gguf_parameters."""
    text_model_parameters(writer, config)
    sliding_window_parameters(writer, config)


def granite_parameters(writer, config: dict[str, Any]) -> None:
    """GraniteModel.set_gguf_parameters: Llama's plus Granite's four multipliers (as llama.cpp's scales)."""
    config = {key: value for key, value in config.items() if key != "head_dim"}  # Granite ignores head_dim
    llama_parameters(writer, config)
    if scale := config.get("attention_multiplier"):
        writer.add_attention_scale(scale)
    if scale := config.get("embedding_multiplier"):
        writer.add_embedding_scale(scale)
    if scale := config.get("residual_multiplier"):
        writer.add_residual_scale(scale)
    if scale := config.get("logits_scaling"):
        writer.add_logit_scale(scale)


def exaone_parameters(writer, config: dict[str, Any]) -> None:
    """ExaoneModel.set_gguf_parameters (transformers reads EXAONE into LlamaForCausalLM: Llama's names here)."""
    text_model_parameters(writer, config)
    writer.add_rope_dimension_count(rope_dims(config))


def cohere_parameters(writer, config: dict[str, Any]) -> None:
    """CommandR2Model.set_gguf_parameters."""
    import gguf

    text_model_parameters(writer, {**config, "max_position_embeddings": hparam(
        config, "model_max_length", "max_position_embeddings")})
    writer.add_logit_scale(config["logit_scale"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def cohere2_parameters(writer, config: dict[str, Any]) -> None:
    """Cohere2Model.set_gguf_parameters (llama.cpp's cohere2 ropes only the sliding layers, as transformers does)."""
    import gguf

    text_model_parameters(writer, config)
    writer.add_logit_scale(config["logit_scale"])
    sliding_window_parameters(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(rope_dims(config))
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def nemotron_parameters(writer, config: dict[str, Any]) -> None:
    """NemotronModel.set_gguf_parameters: LayerNorm eps from `norm_eps`, partial rotary."""
    text_model_parameters(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_layer_norm_eps(hparam(config, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps"))
    writer.add_rope_dimension_count(rope_dims(config))


def glm4_parameters(writer, config: dict[str, Any]) -> None:
    """Glm4Model.set_gguf_parameters: rotary over `partial_rotary_factor` (0.5) of each head."""
    text_model_parameters(writer, config)
    factor = hparam(config.get("rope_parameters") or {}, "partial_rotary_factor", default=0.5)
    writer.add_rope_dimension_count(int(head_dim(config) * factor))


def exaone4_parameters(writer, config: dict[str, Any]) -> None:
    """Exaone4Model.set_gguf_parameters (llama.cpp's exaone4 ropes only the sliding layers when there are any, as
    transformers does)."""
    text_model_parameters(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    sliding_window_parameters(writer, config)


def exaone4_check(config: dict[str, Any]) -> str | None:
    """llama.cpp's exaone4 slides (and leaves the global layers unroped) only in the 64-layer 32B model; any other
    depth runs every layer global with rope."""
    sliding = config.get("sliding_window") and "sliding_attention" in (config.get("layer_types") or [])
    if sliding and config["num_hidden_layers"] != 64:
        return (f"sliding-window layers in {config['num_hidden_layers']} layers (llama.cpp's exaone4 has them only "
                "in the 64-layer model)")
    return None


def chatglm_parameters(writer, config: dict[str, Any]) -> None:
    """ChatGLMModel.set_gguf_parameters for transformers' GlmForCausalLM (GLM-4-9B): the config's own context,
    norm eps and rope base, which ChatGLMModel reads under ChatGLM's names (seq_length, layernorm_epsilon,
    rope_ratio)."""
    text_model_parameters(writer, config)
    factor = hparam(config.get("rope_parameters") or {}, "partial_rotary_factor", default=0.5)
    writer.add_rope_dimension_count(int(head_dim(config) * factor))
