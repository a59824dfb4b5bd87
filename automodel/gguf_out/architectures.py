"""llama.cpp's conversion rules for each architecture we export: GGUF architecture, metadata and tensor changes.

The tensor names come from the `gguf` package (`gguf.get_tensor_name_map`, llama.cpp's own TensorNameMap) and the
metadata keys from its GGUFWriter. What the package does not hold are the per-architecture rules of llama.cpp's
converter, `convert_hf_to_gguf.py` (its `conversion/` classes: LlamaModel, Qwen2Model, Qwen3Model, GemmaModel,
Phi3MiniModel, StableLMModel, StarCoder2Model). That converter is not in any installable package (it ships only in
llama.cpp's source tree), reads a saved HF folder rather than a loaded model, and buffers lazily whole models of
tensors; so the rules are restated here, one `Rules` row per Hugging Face `model_type`, each citing the class it
follows. They are few: which hparams are written, Llama's Q/K row permutation (llama.cpp's rope pairs neighbouring
dimensions, HF's pairs halves), Gemma's `1 + weight` RMSNorm. llama.cpp itself checks every row in
tests/test_gguf_export.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from automodel.errors import UserError


def hparam(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of `keys` the config sets (llama.cpp's `find_hparam`)."""
    return next((config[key] for key in keys if config.get(key) is not None), default)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps rope_theta and scaling in `rope_parameters`; older configs at the top level."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hparam(config, "rope_theta", "rotary_emb_base"))
    rope.setdefault("partial_rotary_factor", hparam(config, "partial_rotary_factor", "rope_pct"))
    rope.setdefault("rope_type", rope.get("type"))
    return rope


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


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


def gemma_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """GemmaModel.modify_tensors: Gemma's RMSNorm multiplies by (1 + weight), llama.cpp's by weight."""
    return tensor + 1 if name.endswith("norm.weight") else tensor


def unchanged(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    return tensor


def text_model_parameters(writer, config: dict[str, Any]) -> None:
    """TextModel.set_gguf_parameters, the part that applies to the dense decoders here."""
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
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def llama_parameters(writer, config: dict[str, Any]) -> None:
    """LlamaModel.set_gguf_parameters."""
    text_model_parameters(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim(config))


def phi3_parameters(writer, config: dict[str, Any]) -> None:
    """Phi3MiniModel.set_gguf_parameters (without longrope factors, which stop in `check_rope`)."""
    text_model_parameters(writer, config)
    rope = rope_parameters(config)
    rope_dims = int((rope["partial_rotary_factor"] or 1.0) * config["hidden_size"]) // config["num_attention_heads"]
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_scaling_orig_ctx_len(hparam(config, "original_max_position_embeddings",
                                                "max_position_embeddings"))
    writer.add_sliding_window(config.get("sliding_window") or 0)


def stablelm_parameters(writer, config: dict[str, Any]) -> None:
    """StableLMModel.set_gguf_parameters."""
    text_model_parameters(writer, config)
    factor = rope_parameters(config)["partial_rotary_factor"] or 1.0
    writer.add_rope_dimension_count(int(factor * head_dim(config)))
    writer.add_parallel_residual(config.get("use_parallel_residual", True))


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


def _false(value: Any) -> bool:
    return not value


RULES = {
    "llama": Rules("LLAMA", "LlamaModel", llama_parameters, llama_tensor, ("default", "linear", "llama3")),
    "mistral": Rules("LLAMA", "LlamaModel (MistralForCausalLM)", llama_parameters, llama_tensor),
    "qwen2": Rules("QWEN2", "Qwen2Model", unsupported=(("use_sliding_window", _false, "false"),)),
    "qwen3": Rules("QWEN3", "Qwen3Model", unsupported=(("use_sliding_window", _false, "false"),)),
    "gemma": Rules("GEMMA", "GemmaModel", tensor=gemma_tensor, skipped=("lm_head.weight",)),
    "phi3": Rules("PHI3", "Phi3MiniModel", phi3_parameters),
    "stablelm": Rules("STABLELM", "StableLMModel", stablelm_parameters, needs_output=True,
                      unsupported=(("qk_layernorm", _false, "false"),)),
    "starcoder2": Rules("STARCODER2", "StarCoder2Model"),
}


def rules_for(config: dict[str, Any]) -> Rules:
    """The export rules of a model config, or a one-line error naming the architecture."""
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or [model_type])[0]
    if model_type not in RULES:
        supported = ", ".join(sorted(RULES))
        raise UserError(f"--format gguf: {architecture} (model_type '{model_type}') has no GGUF export; "
                        f"supported model_types: {supported}")
    rules = RULES[model_type]
    rope_type = rope_parameters(config)["rope_type"] or "default"
    if rope_type not in rules.rope_types:
        raise UserError(f"--format gguf: {architecture} with rope type '{rope_type}' has no GGUF export "
                        f"(supported: {', '.join(rules.rope_types)})")
    for key, allowed, expected in rules.unsupported:
        if not allowed(config.get(key)):
            raise UserError(f"--format gguf: {architecture} with {key}={config.get(key)!r} has no GGUF export "
                            f"(llama.cpp's {rules.arch.lower()} needs {expected})")
    return rules


def extra_tensors(rules: Rules, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """LlamaModel.generate_extra_tensors: Llama 3's rope frequency factors as the `rope_freqs` tensor."""
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return {}
    import math

    dim, base = head_dim(config), rope["rope_theta"] or 10000.0
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}


def linear_rope_parameters(writer, config: dict[str, Any]) -> None:
    """TextModel.set_gguf_parameters' linear rope scaling."""
    import gguf

    rope = rope_parameters(config)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
