"""llama.cpp's conversion rules for transformers' Bamba (BambaForCausalLM: Mamba-2 layers and a few attention
layers, each followed by a SwiGLU MLP): llama.cpp's `granitehybrid` architecture, converted by GraniteHybridModel
(conversion/granite.py, registered for BambaForCausalLM too), which takes the Mamba-2 layers' rules from
Mamba2Model (conversion/mamba.py) and the attention layers' from GraniteMoeModel (Llama's Q/K permutation).

What the Mamba-2 layers change: `A_log` is written as A = -exp(A_log), A and D as [heads, 1] (Mamba-1's shape),
the depthwise conv1d [channels, 1, kernel] without its middle axis, the gated norm [inner] as [groups, inner /
groups] (llama.cpp normalises each group, as transformers' BambaRMSNormGated does), `dt_bias` under the name
llama.cpp's map knows (`dt_proj.bias`). Which layers are recurrent is written as a per-layer KV head count, 0 for a
Mamba-2 layer. Two departures from the converter, both where it would not reproduce transformers' Bamba: the rope
dimension count is transformers' (Bamba's hard-coded partial rotary factor 0.5 of the head; the converter reads the
published configs' `attn_rotary_emb`, the same number there, and the full head without it), and Q/K are permuted
over those rotary dimensions only (transformers rotates the halves of the first half of each head; llama.cpp's
rope pairs neighbours among its first n_rot dimensions, so a whole-head permutation, the converter's, moves rotary
dimensions out of llama.cpp's rotated part). The converter's vocabulary padding to a multiple of 8 is left out: it
adds tokens but no embedding rows.

llama.cpp's graph (src/models/granite-hybrid.cpp, mamba-base.cpp) fixes what a config could vary: an expansion of
2, the conv1d bias present and no in/out projection biases, SiLU, no time-step clamp, rope in every attention layer
(which transformers' Bamba has). The chunk size only orders transformers' scan; llama.cpp scans token by token. Any
state size runs (a CUDA build runs the scan on the CPU unless the state is 96, 128 or 256 and the Mamba-2 head a
multiple of 16).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from automodel.gguf_out.hparams import Piece, head_dim, hparam, permute_for_rope, rope_dims, rope_parameters

MAMBA = "mamba."


def attention_layers(config: dict[str, Any]) -> list[int]:
    """transformers' Bamba: the layers in `attn_layer_indices` attend, the others are Mamba-2 layers."""
    return sorted(config.get("attn_layer_indices") or [])


def bamba_check(config: dict[str, Any]) -> str | None:
    limit = tuple(config.get("time_step_limit") or ())
    if limit != (0.0, math.inf):
        return f"time_step_limit={config.get('time_step_limit')!r} (llama.cpp's granite_hybrid does not clamp dt)"
    attending = attention_layers(config)
    if not attending or len(attending) == config["num_hidden_layers"]:
        # GraniteHybridModel asserts attention layers are given, and makes an all-attention model llama.cpp's
        # `granite` architecture, whose rules for Bamba are not restated here
        return (f"attn_layer_indices={config.get('attn_layer_indices')!r} (the GGUF export needs both Mamba-2 and "
                "attention layers)")
    return None


def bamba_parameters(writer, config: dict[str, Any]) -> None:
    """GraniteHybridModel.set_gguf_parameters: GraniteMoeModel's (Llama's text hparams; Bamba has none of
    Granite's multipliers) with the KV head count per layer, then the Mamba-2 mixer's. Each key is written once
    (the converter writes the KV head count and context length twice, overwriting)."""
    n_layers = config["num_hidden_layers"]
    attending = set(attention_layers(config))
    writer.add_block_count(n_layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    kv_heads = hparam(config, "num_key_value_heads", default=config["num_attention_heads"])
    writer.add_head_count_kv([kv_heads if layer in attending else 0 for layer in range(n_layers)])
    writer.add_rope_freq_base(rope_parameters(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(rope_dims(config))
    writer.add_rope_scaling_finetuned(True)  # llama.cpp's switch for rope in the attention layers: Bamba has it
    writer.add_ssm_conv_kernel(config["mamba_d_conv"])
    writer.add_ssm_state_size(config["mamba_d_state"])
    writer.add_ssm_group_count(config["mamba_n_groups"])
    writer.add_ssm_inner_size(config["mamba_expand"] * config["hidden_size"])
    writer.add_ssm_time_step_rank(config["mamba_n_heads"])  # llama.cpp's name for the Mamba-2 head count


def split_mamba(name: str, shape: tuple[int, ...], config: dict[str, Any]) -> list[Piece] | None:
    """Mamba2Model.filter_tensors/modify_tensors, the shapes: a Mamba-2 tensor as llama.cpp's; None for others."""
    layer, _, what = name.rpartition(MAMBA)
    if not layer:
        return None
    if what == "dt_bias":
        return [(f"{layer}{MAMBA}dt_proj.bias", shape, lambda t: t)]
    if what in ("A_log", "D"):
        return [(name, (*shape, 1), lambda t: t.reshape(*shape, 1))]
    if what == "conv1d.weight":
        return [(name, (shape[0], shape[2]), lambda t: t.squeeze(1))]
    if what == "norm.weight":
        groups = config["mamba_n_groups"]
        return [(name, (groups, shape[0] // groups), lambda t: t.reshape(groups, shape[0] // groups))]
    return None


def permute_rotary_part(weight: torch.Tensor, n_head: int, rotary: int) -> torch.Tensor:
    """Llama's Q/K row permutation (rotate-half pairs to neighbours) over the first `rotary` rows of each head;
    the rest of each head, which neither side rotates, stays in place."""
    heads = weight.reshape(n_head, weight.shape[0] // n_head, *weight.shape[1:])
    rotated = permute_for_rope(heads[:, :rotary].reshape(n_head * rotary, *weight.shape[1:]), n_head)
    return torch.cat([rotated.reshape(n_head, rotary, *weight.shape[1:]), heads[:, rotary:]], dim=1).reshape(
        weight.shape)


def bamba_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """Mamba2Model.modify_tensors' A = -exp(A_log); the attention layers' Q/K rows permuted for llama.cpp's rope."""
    if name.endswith(MAMBA + "A_log"):
        return -torch.exp(tensor)
    rotary = rope_dims(config)
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_rotary_part(tensor, config["num_attention_heads"], rotary)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        kv_heads = tensor.shape[0] // head_dim(config)
        return permute_rotary_part(tensor, kv_heads, rotary)
    return tensor
