"""llama.cpp's conversion rules for the GPT-2-shaped decoders (LayerNorm, fused or biased attention, no gated MLP):
Phi-1/2, GPT-NeoX, Falcon, StarCoder (GPTBigCode). Their convert_hf_to_gguf.py classes write the feed-forward width
as 4 x hidden, which the published models have; the config's own width is written here, so that a config with
another (the tiny test models) loads too."""

from __future__ import annotations

from typing import Any

import torch

from automodel.gguf_out.hparams import hparam, rope_parameters


def phi2_parameters(writer, config: dict[str, Any]) -> None:
    """Phi2Model.set_gguf_parameters (with the KV head count of a grouped-query config)."""
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    factor = rope_parameters(config)["partial_rotary_factor"] or 1.0
    writer.add_context_length(hparam(config, "n_positions", "max_position_embeddings"))
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(hparam(config, "intermediate_size", default=4 * n_embd))
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(hparam(config, "num_key_value_heads", default=n_head))
    writer.add_layer_norm_eps(hparam(config, "layer_norm_epsilon", "layer_norm_eps"))
    writer.add_rope_dimension_count(int(factor * n_embd) // n_head)
    if (theta := rope_parameters(config)["rope_theta"]) is not None:
        writer.add_rope_freq_base(theta)


def gptneox_parameters(writer, config: dict[str, Any]) -> None:
    """GPTNeoXModel.set_gguf_parameters (GPT-NeoX has no grouped-query attention: no KV head count)."""
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(n_embd)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(int((rope_parameters(config)["partial_rotary_factor"] or 1.0) * (n_embd // n_head)))
    writer.add_head_count(n_head)
    writer.add_parallel_residual(config.get("use_parallel_residual", True))
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    if (theta := rope_parameters(config)["rope_theta"]) is not None:
        writer.add_rope_freq_base(theta)


def gptneox_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """GPTNeoXModel.modify_tensors: the fused QKV rows per head ([q k v] per head) to [all q, all k, all v]."""
    if not name.endswith(("attention.query_key_value.weight", "attention.query_key_value.bias")):
        return tensor
    n_head, n_embd = config["num_attention_heads"], config["hidden_size"]
    per_head = tensor.reshape(n_head, 3, n_embd // n_head, *tensor.shape[1:])
    return torch.cat([per_head[:, part].reshape(n_embd, *tensor.shape[1:]) for part in range(3)])


def falcon_kv_heads(config: dict[str, Any]) -> int:
    """Falcon-7B's multi-query attention has one KV head; the new decoder architecture (40B, 180B) `num_kv_heads`.
    (FalconModel reads `num_kv_heads` alone, which transformers' config fills with the head count.)"""
    if config.get("new_decoder_architecture"):
        return config["num_kv_heads"]
    return 1 if config.get("multi_query", True) else config["num_attention_heads"]


def falcon_check(config: dict[str, Any]) -> str | None:
    if config.get("alibi"):
        return "alibi=True (llama.cpp's falcon has rotary positions only)"
    if config.get("bias"):
        return "bias=True (llama.cpp's falcon has no linear biases)"
    if not config.get("new_decoder_architecture") and not config.get("parallel_attn", True):
        return "parallel_attn=False (llama.cpp's falcon runs attention and MLP in parallel)"
    return None


def falcon_parameters(writer, config: dict[str, Any]) -> None:
    """FalconModel.set_gguf_parameters."""
    writer.add_context_length(config.get("max_position_embeddings") or 2048)
    writer.add_tensor_data_layout("jploski")  # the QKV rows as falcon_tensor writes them
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(hparam(config, "ffn_hidden_size", default=4 * config["hidden_size"]))
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(falcon_kv_heads(config))
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])
    if (theta := rope_parameters(config)["rope_theta"]) is not None:
        writer.add_rope_freq_base(theta)


def falcon_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """FalconModel.modify_tensors: the fused QKV rows, stored per KV group (its query heads, one key, one value),
    to all queries, then all keys, then all values."""
    if "query_key_value" not in name:
        return tensor
    n_head, n_head_kv = config["num_attention_heads"], falcon_kv_heads(config)
    head = config["hidden_size"] // n_head
    qkv = tensor.view(n_head_kv, n_head // n_head_kv + 2, head, head * n_head)
    q = qkv[:, :-2].reshape(n_head * head, head * n_head)
    k = qkv[:, [-2]].reshape(n_head_kv * head, head * n_head)
    v = qkv[:, [-1]].reshape(n_head_kv * head, head * n_head)
    return torch.cat((q, k, v)).reshape_as(tensor)


def starcoder_parameters(writer, config: dict[str, Any]) -> None:
    """StarCoderModel.set_gguf_parameters (GPTBigCode: multi-query attention, one KV head)."""
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(config["n_head"])
    writer.add_head_count_kv(1)
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])
