"""What every architecture's export rules share: the `Rules` row, config reading, and the hparams llama.cpp's
converter writes for any text model (convert_hf_to_gguf.py's TextModel.set_gguf_parameters)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# one HF tensor as the GGUF tensors it becomes: (a name llama.cpp's tensor map knows, shape, the change)
Piece = tuple[str, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]


def hparam(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of `keys` the config sets (llama.cpp's `find_hparam`)."""
    return next((config[key] for key in keys if config.get(key) is not None), default)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps rope_theta and scaling in `rope_parameters` (per layer type for models with sliding
    layers: the full-attention layers' here, as llama.cpp's converter reads them); older configs at the top level."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    rope.setdefault("rope_theta", hparam(config, "rope_theta", "rotary_emb_base"))
    rope.setdefault("partial_rotary_factor", hparam(config, "partial_rotary_factor", "rope_pct", "rotary_pct"))
    rope.setdefault("rope_type", rope.get("type"))
    return rope


def rope_types(config: dict[str, Any]) -> set[str]:
    """Every rope type the config uses (a model with sliding layers has one per layer type)."""
    nested = config.get("rope_parameters") or {}
    if "full_attention" in nested or "sliding_attention" in nested:
        return {params.get("rope_type") or "default" for params in nested.values()}
    return {rope_parameters(config)["rope_type"] or "default"}


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_dims(config: dict[str, Any]) -> int:
    """Rotary dimensions per head: the partial rotary factor's share of the head."""
    return int((rope_parameters(config)["partial_rotary_factor"] or 1.0) * head_dim(config))


def permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute: HF's rotate-half layout of Q/K rows to llama.cpp's interleaved pairs."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """LlamaModel.modify_tensors (undo_permute): Q rows by attention heads, K rows by KV heads."""
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_for_rope(tensor, config["num_attention_heads"])
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_for_rope(tensor, config.get("num_key_value_heads") or config["num_attention_heads"])
    return tensor


def norm_plus_one(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """GemmaModel / NemotronModel.modify_tensors: their norms multiply by (1 + weight), llama.cpp's by weight."""
    return tensor + 1 if name.endswith("norm.weight") else tensor


def unchanged(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    return tensor


def text_model_parameters(writer, config: dict[str, Any]) -> None:
    """TextModel.set_gguf_parameters, the part that applies to the decoders here."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(hparam(config, "max_position_embeddings", "n_positions"))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(hparam(config, "num_key_value_heads", default=config["num_attention_heads"]))
    rope = rope_parameters(config)
    if rope["rope_theta"] is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    if (rms_eps := hparam(config, "rms_norm_eps")) is not None:
        writer.add_layer_norm_rms_eps(rms_eps)
    if (norm_eps := hparam(config, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")) is not None:
        writer.add_layer_norm_eps(norm_eps)
    if (experts := hparam(config, "num_local_experts", "num_experts")) is not None:
        writer.add_expert_count(experts)
    if (experts_used := hparam(config, "num_experts_per_tok")) is not None:
        writer.add_expert_used_count(experts_used)
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def sliding_window_parameters(writer, config: dict[str, Any]) -> None:
    """The sliding window and which layers use it. llama.cpp's converters write the window and leave the layer
    pattern to each graph's default (Gemma 2: every other layer, Gemma 3: 5 of 6, ...); the pattern is written
    here from the config's `layer_types`, which llama.cpp reads in place of that default (load_swa_pattern), so a
    config whose pattern differs from the published models' is run as transformers runs it."""
    if not config.get("sliding_window"):
        return
    writer.add_sliding_window(config["sliding_window"])
    if layer_types := config.get("layer_types"):
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])


@dataclass(frozen=True)
class Rules:
    arch: str  # the gguf.MODEL_ARCH member's name
    follows: str  # the convert_hf_to_gguf class these rules restate
    parameters: Callable = text_model_parameters
    tensor: Callable = unchanged
    rope_types: tuple[str, ...] = ("default",)
    # llama.cpp's loader for `arch` requires output.weight (no fallback to the token embedding): a tied head is
    # written twice
    needs_output: bool = False
    skipped: tuple[str, ...] = ()  # HF tensors llama.cpp's converter leaves out (GemmaModel: lm_head.weight)
    # config values llama.cpp's graph for `arch` does not implement: (key, what the model must have)
    unsupported: tuple[tuple[str, Callable[[Any], bool], str], ...] = field(default=())
    # a config check beyond single keys: returns what llama.cpp's graph lacks for this config, or None
    check: Callable[[dict[str, Any]], str | None] | None = None
    # an HF tensor that becomes other GGUF tensors (fused experts split into gate and up): its pieces, or None
    split: Callable[[str, tuple[int, ...], dict[str, Any]], list[Piece] | None] | None = None
    # a check of the loaded model's own tensors (Jais's stored ALiBi slopes): what llama.cpp lacks, or None
    model_check: Callable[[Any], str | None] | None = None


def is_false(value: Any) -> bool:
    return not value
