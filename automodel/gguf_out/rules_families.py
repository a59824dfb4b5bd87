"""llama.cpp's conversion rules for the remote-code families automodel reads into its own classes
(automodel/models/families/): Jais, DeepSeek-MoE (v1), DeciLM / Nemotron-NAS, Baichuan-13B / Baichuan2-13B.

These rows apply to the loaded class, not to a `model_type`: the native configs of DeciLM and DeepSeek-MoE are
'llama' configs with extra fields, which Llama's row would export wrongly (architectures.OWN_CLASS_RULES keys them
by class name). The conversion/ classes each function restates are named in its docstring; the per-architecture
llama.cpp graphs (src/models/jais.cpp, deepseek.cpp, deci.cpp, baichuan.cpp) fix what a config may use, and each
check says which part of a graph a config would need that it lacks.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from automodel.gguf_out import rules_moe as moe
from automodel.gguf_out.hparams import (
    Piece, Rules, head_dim, hparam, llama_tensor, permute_for_rope, rope_parameters, text_model_parameters,
)

LAYER = re.compile(r"model\.layers\.(\d+)\.")
# llama.cpp's ALiBi (ggml_soft_max_ext): slopes 2^(-max_bias / n) ... from one `max_alibi_bias`; the ALiBi paper's
# slopes, which Jais stores and Baichuan-13B computes, are those of max_bias 8
ALIBI_MAX_BIAS = 8.0


# --- Jais: JaisModel -----------------------------------------------------------------------------------------------

JAIS_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight", ".c_fc2.weight")


def jais_parameters(writer, config: dict[str, Any]) -> None:
    """JaisModel.set_gguf_parameters, and its max_alibi_bias (jais_check_slopes makes sure the stored slopes are
    those of ALIBI_MAX_BIAS, as the converter derives it from the first one)."""
    writer.add_block_count(config["n_layer"])
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])
    writer.add_max_alibi_bias(ALIBI_MAX_BIAS)


def jais_split(name: str, shape: tuple[int, ...], config: dict[str, Any]) -> list[Piece] | None:
    """JaisModel.modify_tensors: GPT-2's Conv1D weights (input x output) transposed; the embedding x
    embeddings_scale, the output head x width_scale (`output_logits_scale` here). A tied head is the embedding
    written a second time under its own scale (llama.cpp's jais requires output.weight)."""
    if name.endswith(JAIS_CONV1D):
        return [(name, shape[::-1], lambda t: t.T)]
    embed, out = config["embeddings_scale"], config["output_logits_scale"]
    if name == "transformer.wte.weight":
        pieces = [(name, shape, lambda t: t * embed)]
        if config.get("tie_word_embeddings", True):
            pieces.append(("lm_head.weight", shape, lambda t: t * out))
        return pieces
    if name == "lm_head.weight":
        return [(name, shape, lambda t: t * out)]
    return None


def jais_check(config: dict[str, Any]) -> str | None:
    if config.get("attention_scale_power") != 1.0:
        return ("scores / sqrt(head_dim) (scale_qk_dot_by_d false; llama.cpp's jais divides the scores by "
                "head_dim)")
    return None


def jais_check_slopes(model) -> str | None:
    """The stored ALiBi slopes must be the paper's (llama.cpp recomputes them from max_alibi_bias)."""
    from automodel.models.families.alibi import alibi_slopes

    stored = model.transformer.relative_pe.slopes.detach().float().cpu()
    expected = alibi_slopes(stored.shape[0])
    if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-6, atol=0.0):
        return ("ALiBi slopes other than the ALiBi paper's (transformer.relative_pe.slopes; llama.cpp computes "
                f"the paper's from max_alibi_bias {ALIBI_MAX_BIAS:g})")
    return None


JAIS = Rules("JAIS", "JaisModel", jais_parameters, split=jais_split, skipped=("transformer.relative_pe.slopes",),
             check=jais_check, model_check=jais_check_slopes)


# --- DeepSeek-MoE (DeepSeek v1): DeepseekModel ---------------------------------------------------------------------

def deepseek_moe_parameters(writer, config: dict[str, Any]) -> None:
    """DeepseekModel.set_gguf_parameters (its expert count is text_model_parameters' `num_experts`)."""
    import gguf

    text_model_parameters(writer, config)
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    writer.add_leading_dense_block_count(config["first_k_dense_replace"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_weights_scale(1.0)
    writer.add_expert_shared_count(config["n_shared_experts"])


def deepseek_moe_check(config: dict[str, Any]) -> str | None:
    """llama.cpp's deepseek: every layer from leading_dense_block_count on is sparse, the top-k softmax weights are
    used as they are (deepseek-moe-16b's norm_topk_prob false)."""
    if config.get("moe_layer_freq", 1) != 1:
        return f"moe_layer_freq={config['moe_layer_freq']} (llama.cpp's deepseek makes every later layer sparse)"
    if config.get("norm_topk_prob"):
        return "norm_topk_prob=True (llama.cpp's deepseek does not renormalise the top-k weights)"
    return None


DEEPSEEK_MOE = Rules("DEEPSEEK", "DeepseekModel", deepseek_moe_parameters, llama_tensor, split=moe.split_experts,
                     check=deepseek_moe_check)


# --- DeciLM / Nemotron-NAS: DeciModel ------------------------------------------------------------------------------

def deci_layers(config: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(heads, KV heads, FFN width) of each layer, 0 for an absent (no_op) part: DeciModel.__init__'s arrays."""
    from automodel.models.families.decilm import ffn_width

    layers = []
    for block in config["block_configs"]:
        attention, ffn = block["attention"], block["ffn"]
        heads = 0 if attention.get("no_op") else config["num_attention_heads"]
        kv_heads = heads // (attention.get("n_heads_in_group") or 1) if heads else 0
        width = 0 if ffn.get("no_op") else ffn_width(ffn["ffn_mult"], config["hidden_size"])
        layers.append((heads, kv_heads, width))
    return layers


def deci_parameters(writer, config: dict[str, Any]) -> None:
    """DeciModel.set_gguf_parameters (the block_configs branch): per-layer head, KV head and FFN arrays."""
    heads, kv_heads, widths = (list(values) for values in zip(*deci_layers(config)))
    if (theta := rope_parameters(config)["rope_theta"]) is not None:
        writer.add_rope_freq_base(theta)
    writer.add_head_count_kv(kv_heads)
    writer.add_head_count(heads)
    writer.add_feed_forward_length(widths)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim(config))


def deci_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """DeciModel.modify_tensors: Llama's Q/K permutation, K by its own layer's KV heads."""
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        layer = int(LAYER.match(name)[1])
        return permute_for_rope(tensor, deci_layers(config)[layer][1])
    return llama_tensor(name, tensor, config)


def deci_check(config: dict[str, Any]) -> str | None:
    """llama.cpp's deci graph: head size from layer 0's head count (the file does not load without); a layer
    without FFN is skipped whole (its attention dropped), which is right only for a layer with neither part, and
    not as the last layer (its rows are never cut to the outputs asked for: llama.cpp aborts when it asks for fewer
    logits than tokens, as in generation)."""
    layers = deci_layers(config)
    if layers[0][0] == 0:
        return "no attention in layer 0 (llama.cpp's deci sizes every head from layer 0's)"
    for index, (heads, _, width) in enumerate(layers):
        if heads and not width:
            return f"attention without FFN in layer {index} (llama.cpp's deci drops such a layer's attention)"
    if layers[-1] == (0, 0, 0):
        return "neither attention nor FFN in the last layer (llama.cpp's deci aborts on it in generation)"
    return None


DECILM = Rules("DECI", "DeciModel", deci_parameters, deci_tensor, rope_types=("default", "llama3"),
               check=deci_check)


# --- Baichuan-13B / Baichuan2-13B (ALiBi): BaichuanModel -----------------------------------------------------------

# llama.cpp's baichuan picks its positions by the layer count: rotary at 32 (7B), ALiBi (max bias 8) at 40 (13B),
# none at all otherwise
BAICHUAN_ALIBI_LAYERS = 40


def baichuan_parameters(writer, config: dict[str, Any]) -> None:
    """BaichuanModel.set_gguf_parameters."""
    text_model_parameters(writer, config)
    writer.add_tensor_data_layout("Meta AI original pth")
    writer.add_rope_dimension_count(head_dim(config))


def baichuan_alibi_check(config: dict[str, Any]) -> str | None:
    layers = hparam(config, "num_hidden_layers")
    if layers != BAICHUAN_ALIBI_LAYERS:
        return (f"num_hidden_layers={layers} (llama.cpp's baichuan uses ALiBi only for its 13B type, "
                f"{BAICHUAN_ALIBI_LAYERS} layers)")
    return None


# (BaichuanModel.modify_tensors: W_pack is split on load already, q and k permuted as Llama's; Baichuan2-13B's
# NormHead is written normalised by families.with_norm_head, as Baichuan2-7B's)
BAICHUAN_ALIBI = Rules("BAICHUAN", "BaichuanModel", baichuan_parameters, llama_tensor, needs_output=True,
                       check=baichuan_alibi_check)
