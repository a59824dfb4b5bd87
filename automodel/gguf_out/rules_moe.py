"""llama.cpp's conversion rules for the mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite
MoE (and Granite MoE Shared). transformers 5 holds each layer's experts fused: `experts.gate_up_proj` [experts,
2 x ffn, hidden] (gate rows first) and `experts.down_proj` [experts, hidden, ffn]; llama.cpp's 3-D `ffn_gate_exps`/
`ffn_up_exps`/`ffn_down_exps` are the same arrays, gate and up apart: `split_experts` cuts the fused one in two, as
Qwen2MoeModel.modify_tensors does for the same layout (the converter's older path stacks per-expert tensors, which
a transformers 5 model no longer has)."""

from __future__ import annotations

import re
from typing import Any

from automodel.gguf_out.hparams import Piece, text_model_parameters
from automodel.gguf_out.rules_dense import granite_parameters

EXPERTS = re.compile(r"(?P<layer>model\.layers\.\d+)\.(mlp|block_sparse_moe|shared_mlp)\."
                     r"(?P<what>experts\.gate_up_proj|experts\.down_proj|router\.weight|input_linear\.weight)")


def split_experts(name: str, shape: tuple[int, ...], config: dict[str, Any]) -> list[Piece] | None:
    """A fused expert tensor as llama.cpp's per-kind expert tensors, named as the converter names them for its
    tensor map (`model.layers.N.mlp.experts.gate_proj.weight`, ...); Granite MoE's router under the same map's
    name, and Granite MoE Shared's fused shared expert (GraniteMoeModel.modify_tensors) as the shared expert's gate
    and up. None for any other tensor."""
    match = EXPERTS.fullmatch(name)
    if match is None:
        return None
    layer, what = match["layer"], match["what"]
    if what == "router.weight":  # GraniteMoe
        return [(f"{layer}.mlp.gate.weight", shape, lambda t: t)]
    if what == "input_linear.weight":  # GraniteMoeShared's shared expert: [gate; up] rows
        ffn = shape[0] // 2
        return [(f"{layer}.mlp.shared_expert.gate_proj.weight", (ffn, shape[1]), lambda t: t[:ffn]),
                (f"{layer}.mlp.shared_expert.up_proj.weight", (ffn, shape[1]), lambda t: t[ffn:])]
    if what == "experts.down_proj":
        return [(f"{layer}.mlp.experts.down_proj.weight", shape, lambda t: t)]
    experts, rows, hidden = shape
    ffn = rows // 2
    return [(f"{layer}.mlp.experts.gate_proj.weight", (experts, ffn, hidden), lambda t: t[:, :ffn]),
            (f"{layer}.mlp.experts.up_proj.weight", (experts, ffn, hidden), lambda t: t[:, ffn:])]


def every_layer_sparse(config: dict[str, Any]) -> str | None:
    """llama.cpp's MoE graphs give every layer the MoE block (Qwen's `decoder_sparse_step`/`mlp_only_layers` can
    make some layers dense)."""
    if (config.get("decoder_sparse_step") or 1) != 1 or config.get("mlp_only_layers"):
        return (f"decoder_sparse_step={config.get('decoder_sparse_step')!r}, "
                f"mlp_only_layers={config.get('mlp_only_layers')!r} (llama.cpp makes every layer sparse)")
    return None


def routing(normalised: bool):
    """A check that the router's top-k weights are renormalised as llama.cpp's graph for the arch does."""
    def check(config: dict[str, Any]) -> str | None:
        if bool(config.get("norm_topk_prob", normalised)) != normalised:
            return (f"norm_topk_prob={config.get('norm_topk_prob')!r} (llama.cpp's graph "
                    f"{'renormalises' if normalised else 'does not renormalise'} the top-k weights)")
        return every_layer_sparse(config)
    return check


def qwen2moe_parameters(writer, config: dict[str, Any]) -> None:
    """Qwen2MoeModel.set_gguf_parameters (also Qwen3MoeModel's)."""
    text_model_parameters(writer, config)
    if config.get("moe_intermediate_size") is not None:
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size") is not None:
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def granitemoe_parameters(writer, config: dict[str, Any]) -> None:
    """GraniteMoeModel.set_gguf_parameters."""
    granite_parameters(writer, config)
    if config.get("shared_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_intermediate_size"])


def olmoe_check(config: dict[str, Any]) -> str | None:
    """llama.cpp's olmoe normalises keys over the whole hidden size (OLMoE has as many KV heads as heads)."""
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    if kv_heads != config["num_attention_heads"]:
        return (f"num_key_value_heads={kv_heads} (llama.cpp's olmoe needs as many as num_attention_heads, "
                f"{config['num_attention_heads']})")
    return routing(normalised=False)(config)
